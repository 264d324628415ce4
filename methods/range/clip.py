"""``clip`` range: AWQ's weight-clipping search (an MSE-optimal range per group on the linear's output).

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024,
https://arxiv.org/abs/2306.00978 (the reference code's ``auto_clip``).

Each (row, group) of a weight gets a clipping threshold from ``max|w_group| · (1 - i/20)`` for ``i < 10``: the
weight is clamped to ``[-t, t]`` and quantized with min-max RTN, and the threshold that minimises that group's share
of the linear's output error on calibration inputs wins. The clamped weight is what the rounding stage puts on its
grid, so the search combines with nearest rounding (AWQ) and with GPTQ (whose per-group min-max range then starts
from the clipped weight).

Paper defaults kept: 20-point grid, max shrink 0.5, q_proj/k_proj not clipped (the reference code: their error
passes through ``q·kᵀ``, which the per-linear objective does not see).

Inputs the error is scored on: after the ``awq`` transform, its sample (512 tokens strided over the calibration
set, from the layer as it arrived, in the scaled basis), as in the reference code; after any other transform,
the diagonal blocks of the GPTQ Hessian of the linear's inputs (all calibration tokens, true-sequential: the inputs
of the layer with its earlier linears already quantized), shared with a GPTQ rounding stage.

Deviation (documented): the error per group is computed from the Gram matrix of the inputs (same objective as the
reference's token-by-token sum, fewer operations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptqbench.errors import ConfigError
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import QuantizedWeight, rtn_fake_quant, rtn_quantize
from ptqbench.stages import InputStats, RangeStage, register_stage

SKIP = ("q_proj", "k_proj")  # the reference code does not clip these (their error passes through q·kᵀ)


@dataclass
class ClipConfig(MethodConfig):
    clip_grid: int = 20  # clip thresholds max|w| · (1 - i/clip_grid)
    max_shrink: float = 0.5  # ... for i < max_shrink · clip_grid

    def __post_init__(self) -> None:
        if self.clip_grid < 1:
            raise ConfigError(f"clip.clip_grid={self.clip_grid}: use a positive grid size (paper: 20)")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"clip.max_shrink={self.max_shrink}: use a value in [0, 1) (paper: 0.5)")
        super().__post_init__()


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, sym: bool, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per-(row, group) clip threshold (out, n_groups) minimising each group's share of the output error.

    Candidates are ``max|w_group| · (1 - i/n_grid)`` for ``i < max_shrink·n_grid``; the weight is clamped to
    ``[-t, t]`` then quantized with min-max RTN. ``gram`` (G, gs, gs) is the per-group ``Σ xᵀx`` of the linear's
    (already scaled) inputs, so a group's error ``Σ_n (x_g·Δw_g)²`` is ``Δw_g · gram_g · Δw_gᵀ`` — the reference
    code's token-by-token error, without materialising (tokens × out) products.
    """
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ConfigError(f"the clip range needs a group_size dividing in_features={in_f}: "
                          "set quant.partial_group=false")
    ng = in_f // gs
    wg = w.float().reshape(out_f, ng, gs)  # (out, G, gs)
    org_max = wg.abs().amax(dim=-1, keepdim=True)  # (out, G, 1)
    best_err = torch.full((out_f, ng), math.inf, device=w.device)
    best_max = org_max.squeeze(-1).clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        max_val = org_max * (1 - i / n_grid)
        cur = torch.clamp(wg, -max_val, max_val)
        q = rtn_fake_quant(cur.reshape(out_f, in_f), bits, group_size, sym).reshape(out_f, ng, gs)
        dw = (q - wg).transpose(0, 1)  # (G, out, gs)
        err = (torch.bmm(dw, gram.float()) * dw).sum(-1).t()  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val.squeeze(-1), best_max)
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` (out, in) clamped to ``[-max_val, max_val]`` per (row, group) (max_val: (out, n_groups))."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    m = max_val.reshape(out_f, -1, 1)
    return torch.clamp(w.float().reshape(out_f, -1, gs), -m, m).reshape(out_f, in_f)


@register_stage
class ClipSearch(RangeStage):
    """AWQ's clipping search (Lin et al., 2024): per-group thresholds minimising the linear's output error."""

    name = "clip"
    family = "salience/scaling"
    config_cls = ClipConfig
    requires_calibration = True
    needs_inputs = True
    paper = "https://arxiv.org/abs/2306.00978"
    config: ClipConfig

    @torch.no_grad()
    def prepare(self, name: str, w: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        if name.split(".")[-1] in SKIP:
            return w
        if stats is None:
            raise RuntimeError("the clip range needs input statistics: run it inside the calibration loop")
        sch, c = self.scheme, self.config
        w = w.float()
        return apply_clip(w, search_clip(w, stats.gram(name), sch.w_bits, sch.group_size, sch.sym, c.clip_grid,
                                         c.max_shrink), sch.group_size)

    def nearest(self, name: str, w: torch.Tensor) -> QuantizedWeight:
        return rtn_quantize(w, self.scheme.w_bits, self.scheme.group_size, self.scheme.sym)
