"""``nearest`` rounding (synonym ``rtn``): every weight to the nearest level of its group's grid.

The grid is the range stage's (min-max, a clipped weight's min-max, HQQ's optimized zero, learned clipping). No
error compensation: each weight is rounded on its own, so the result does not depend on the order of the linears.
Inside the calibration loop (when another stage needs it) the linears are visited in execution order, and a range
stage that scores its choice on inputs sees the layer with the earlier linears already quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.pipeline import LayerContext
from ptqbench.quantizer import MethodConfig, set_linear_weight
from ptqbench.scheme import FORMATS, QuantizedWeight
from ptqbench.stages import InputStats, RangeStage, Rounding, register_stage


@dataclass
class NearestConfig(MethodConfig):
    """No parameters."""


@register_stage
class Nearest(Rounding):
    """Round to nearest on the range stage's grid (RTN)."""

    name = "nearest"
    supported_formats = FORMATS  # the range stage fits the grid
    synonyms = ("rtn",)
    family = "calibration-free"
    config_cls = NearestConfig

    @torch.no_grad()
    def quantize_layer(self, ctx: LayerContext, rng: RangeStage) -> dict[str, QuantizedWeight]:
        stats = InputStats(ctx, self.scheme.group_size) if rng.needs_inputs else None
        targets = set(ctx.targets)
        linears = ctx.linears
        out: dict[str, QuantizedWeight] = {}
        for group in ctx.groups():
            for name in (n for n in group if n in targets):
                lin = linears[name]
                qw = rng.nearest(name, rng.prepare(name, lin.weight.data, stats))
                set_linear_weight(lin, qw)
                out[name] = qw
        return out
