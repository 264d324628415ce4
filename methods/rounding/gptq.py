"""``gptq`` rounding: GPTQ — Accurate Post-Training Quantization for Generative Pre-trained Transformers.

Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023, https://arxiv.org/abs/2210.17323. The alias ``gptq`` is the recipe
``none+minmax+gptq``; ``quarot`` is ``quarot+minmax+gptq``.

Quantizes a linear column by column and spreads each column's rounding error onto the columns not yet quantized,
weighted by the inverse Hessian of the layer's squared output error (``H = 2 X Xᵀ`` from calibration inputs).
Paper defaults kept: dampening 1% of the mean diagonal (``percdamp=0.01``), Cholesky form of the inverse Hessian,
lazy batch updates of 128 columns, true-sequential order inside a layer (q/k/v, then o, then gate/up, then down,
each calibrated on inputs produced by the already-quantized parts). ``act_order`` (quantize columns in order of
decreasing Hessian diagonal) is on by default as in the reference code's recommended LLaMA setting;
``static_groups`` computes all group ranges before the act-order pass so groups stay contiguous in the original
column order (kernel-friendly).

With a range stage that chooses the range in the weight domain (``clip``), GPTQ rounds the range stage's
weight: each group's min-max range is then taken from the clipped columns as GPTQ has updated them. Ranges fitted
jointly with nearest rounding (``hqq``, ``lwc``) are refused with GPTQ (their fit assumes the weight it was fitted
on, which GPTQ rewrites column by column).

Deviation (documented): a group's range is computed from the columns as already updated by earlier in-block error
feedback; the reference code reads them from the not-yet-updated matrix when the group starts inside a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.errors import ConfigError
from ptqbench.pipeline import LayerContext
from ptqbench.quantizer import MethodConfig, set_linear_weight
from ptqbench.scheme import QuantizedWeight, compute_qparams, few_threads, qmax
from ptqbench.stages import InputStats, RangeStage, Rounding, register_stage


@dataclass
class GPTQConfig(MethodConfig):
    percdamp: float = 0.01  # dampening, fraction of the mean Hessian diagonal
    blocksize: int = 128  # lazy batch-update block (columns)
    act_order: bool = True  # columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # group ranges fixed before act-order (keeps groups contiguous)
    true_sequential: bool = True  # q/k/v → o → gate/up → down, each on inputs from the quantized parts before it

    def __post_init__(self) -> None:
        if not 0 < self.percdamp < 1:
            raise ConfigError(f"gptq.percdamp={self.percdamp}: use a value in (0, 1), the paper uses 0.01")
        if self.blocksize < 1:
            raise ConfigError(f"gptq.blocksize={self.blocksize}: use a positive number of columns (paper: 128)")
        super().__post_init__()


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False, percdamp: float = 0.01,
    blocksize: int = 128, act_order: bool = False, static_groups: bool = False,
) -> QuantizedWeight:
    """GPTQ on one weight ``w`` (out, in) with Hessian ``h`` (in, in); returns codes, scales, zeros and ``g_idx``."""
    w = w.detach().clone().float()  # (out, in)
    h = h.detach().clone().float()  # (in, in)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    maxq = qmax(bits)

    dead = torch.diag(h) == 0  # inputs never active: any value works, pick 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups:  # ranges over the original, contiguous groups
        static = [compute_qparams(w[:, g: g + gs], bits, sym) for g in range(0, in_f, gs)]

    perm = torch.arange(in_f, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    inv_perm = torch.argsort(perm)

    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    with few_threads(w):  # small factorizations: one thread avoids hand-off stalls on a busy CPU
        hinv = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(hinv)
        hinv = torch.linalg.cholesky(hinv, upper=True)  # (in, in) upper Cholesky factor of H⁻¹

    codes = torch.zeros_like(w)  # (out, in) in processing order
    g_idx = torch.zeros(in_f, dtype=torch.long, device=w.device)  # processing position -> group
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = torch.empty(0)
    with few_threads(w):
        for i1 in range(0, in_f, blocksize):
            i2 = min(i1 + blocksize, in_f)
            w1 = w[:, i1:i2].clone()  # (out, block)
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if static_groups:
                    gi = int(perm[col]) // gs
                    scale, zero = static[gi]
                else:
                    if col % gs == 0:  # a new group starts: its range from the current (updated) columns
                        group = w1[:, i: i + gs]
                        if col + gs > i2:  # the group runs past this block
                            group = torch.cat([group, w[:, i2: col + gs]], dim=1)
                        scale, zero = compute_qparams(group, bits, sym)
                        scales.append(scale)
                        zeros.append(zero)
                    gi = col // gs
                g_idx[col] = gi
                wc = w1[:, i]
                q = torch.clamp(torch.round(wc / scale) + zero, 0, maxq)
                codes[:, col] = q
                err = (wc - (q - zero) * scale) / hinv1[i, i]
                w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # spread the error onto the later columns
                err1[:, i] = err
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # lazy update of the columns after this block

    if static_groups:
        scales = [s for s, _ in static]
        zeros = [z for _, z in static]
    s = torch.stack(scales, 1)  # (out, n_groups)
    z = torch.stack(zeros, 1)  # (out, n_groups)
    codes = codes[:, inv_perm]
    g_orig = g_idx[inv_perm]  # (in,) group of each original column
    return QuantizedWeight(codes.to(torch.uint8).cpu(), s.to(torch.float16).cpu(), z.to(torch.uint8).cpu(), bits,
                           group_size, g_orig.to(torch.int32).cpu(), sym, meta={"act_order": act_order})


@register_stage
class GPTQ(Rounding):
    """GPTQ (Frantar et al., 2023): second-order error compensation, layer by layer on calibration data."""

    name = "gptq"
    family = "compensation"
    config_cls = GPTQConfig
    requires_calibration = True
    needs_loop = True
    paper = "https://arxiv.org/abs/2210.17323"
    config: GPTQConfig

    def quantize_layer(self, ctx: LayerContext, rng: RangeStage) -> dict[str, QuantizedWeight]:
        targets = set(ctx.targets)
        groups = [[n for n in g if n in targets] for g in ctx.groups()]
        groups = [g for g in groups if g]
        if not self.config.true_sequential:  # all Hessians from the full-precision layer at once
            groups = [[n for g in groups for n in g]]
        linears = ctx.linears
        out: dict[str, QuantizedWeight] = {}
        c, sch = self.config, self.scheme
        stats = InputStats(ctx, sch.group_size)
        for group in groups:
            hs = ctx.hessians(group)
            stats.add_hessians(hs)
            for name in group:
                lin = linears[name]
                w = rng.prepare(name, lin.weight.data, stats)
                qw = gptq_quantize(w, hs[name], sch.w_bits, sch.group_size, sch.sym, c.percdamp, c.blocksize,
                                   c.act_order, c.static_groups)
                set_linear_weight(lin, qw)
                out[name] = qw
        return out
