"""``minmax`` range: each group's scale and zero from its minimum and maximum (the default of every recipe).

The range every PTQ paper's RTN baseline uses: asymmetric ``scale = (max - min) / (2^b - 1)`` with the range widened
to contain 0 and an integer zero point, or symmetric ``scale = 2·max|w| / (2^b - 1)`` (``ptqbench.scheme``). With
GPTQ rounding the range of each group is taken when the group starts, from the columns as GPTQ has updated them
(``methods/rounding/gptq.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import QuantizedWeight, rtn_quantize
from ptqbench.stages import RangeStage, register_stage


@dataclass
class MinMaxConfig(MethodConfig):
    """No parameters beyond the scheme (bits, group size, symmetry)."""


@register_stage
class MinMax(RangeStage):
    """Min-max range per group (the baseline of every PTQ paper); needs no calibration data."""

    name = "minmax"
    family = "calibration-free"
    config_cls = MinMaxConfig

    def nearest(self, name: str, w: torch.Tensor) -> QuantizedWeight:
        return rtn_quantize(w, self.scheme.w_bits, self.scheme.group_size, self.scheme.sym)
