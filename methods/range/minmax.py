"""``minmax`` range: each group's scale and zero from its minimum and maximum (the default of every recipe).

The range every PTQ paper's RTN baseline uses: asymmetric ``scale = (max - min) / (2^b - 1)`` with the range widened
to contain 0 and an integer zero point, or symmetric ``scale = 2·max|w| / (2^b - 1)`` (``ptqbench.scheme``). With
GPTQ rounding the range of each group is taken when the group starts, from the columns as GPTQ has updated them
(``methods/rounding/gptq.py``).

FP4 schemes (``quant=mxfp4`` / ``nvfp4``): symmetric E2M1 values with the format's block scales, chosen as
``quant.scale_search`` says (``ptqbench.fp4``: min-max covers each block's largest magnitude; ``mse`` picks the
candidate scale with the least squared error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.fp4 import fp4_quantize
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import FORMATS, QuantizedWeight, rtn_quantize
from ptqbench.stages import RangeStage, register_stage


@dataclass
class MinMaxConfig(MethodConfig):
    """No parameters beyond the scheme (bits, group size, symmetry)."""


@register_stage
class MinMax(RangeStage):
    """Min-max range per group (the baseline of every PTQ paper); needs no calibration data."""

    name = "minmax"
    supported_formats = FORMATS  # FP4: ptqbench.fp4 block scales (quant.scale_search)
    family = "calibration-free"
    config_cls = MinMaxConfig

    def nearest(self, name: str, w: torch.Tensor) -> QuantizedWeight:
        sch = self.scheme
        if sch.w_format != "int":  # FP4: E2M1 values, the format's block scales (min-max or MSE-searched)
            return fp4_quantize(w, sch.w_format, sch.scale_search)
        return rtn_quantize(w, sch.w_bits, sch.group_size, sch.sym)
