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
from ptqbench.fp4 import block_scales, e2m1_encode, e2m1_round, fp4_weight, tensor_scale
from ptqbench.pipeline import LayerContext
from ptqbench.quantizer import MethodConfig, set_linear_weight
from ptqbench.scheme import FORMATS, FP4_GROUP, QuantizedWeight, compute_qparams, few_threads, qmax
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


@dataclass
class Compensation:
    """Terms that GPTQ's descendants add to its column update; every one optional (plain GPTQ: none).

    Matrices are in the original column order (``gptq_quantize`` permutes them with act-order).

    - ``asym`` (GPTAQ, https://arxiv.org/abs/2504.02692): ``D = 2/N·(X_fp − X_q)ᵀX_q`` (in, in); the update gains
      ``+ w·P[i, i:]`` with ``P = alpha·triu(D·Uᵀ, 1)·U`` (``U``: upper Cholesky factor of ``H⁻¹``), the
      closed-form correction toward the full-precision model's output (neuron decomposition: one (in, in) matrix
      shared by every output row).
    - ``w_orig`` + ``rescomp`` (residual-aware compensation, https://arxiv.org/abs/2604.07955): the
      compensation-aware error ``w_orig − w`` (original minus compensated weights) enters through
      ``R = rescomp·triu((D + H)·Uᵀ, 1)·U``, aligning every step with the original weights' FP output.
    - ``w_orig`` + ``first_order`` (FOEM, https://arxiv.org/abs/2507.11017, Eq. 19): with the gradient of the
      accumulated deviation approximated as ``β·(W − W_orig)·H``, the optimal step's Hessian cancels: column
      ``i``'s error becomes ``(w_i − q_i) − β·(w_i − w_orig,i)``, and the block's remaining columns are pulled
      back by ``β·(W_F − W_orig,F)``; the modified errors reach later blocks through the usual lazy update.
    - ``latent_outer``: the terms multiply the latent (pre-rounding, clamped to the group's grid range) columns
      in the lazy block update, as the math says (ResComp's ``allw``); ``False`` multiplies what the block left in
      its columns (the quantized values: GPTAQ's reference code).
    """

    asym: torch.Tensor | None = None  # (in, in)
    alpha: float = 0.25
    w_orig: torch.Tensor | None = None  # (out, in)
    rescomp: float = 0.0
    first_order: float = 0.0
    pullback: str = "next"  # FOEM's -β(W - W_orig) on the next column only ("next") or the block's rest ("block")
    latent_outer: bool = False


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False, percdamp: float = 0.01,
    blocksize: int = 128, act_order: bool = False, static_groups: bool = False, *,
    comp: Compensation | None = None, keep: torch.Tensor | None = None, fmt: str = "int", scale_search: str = "minmax",
) -> QuantizedWeight:
    """GPTQ on one weight ``w`` (out, in) with Hessian ``h`` (in, in); returns codes, scales, zeros and ``g_idx``.

    ``comp`` adds the update terms of GPTAQ / residual-aware compensation / FOEM. ``keep`` (out, in) bool marks
    weights left in floating point (SpQR-style outliers): they leave their group's range, take no rounding error,
    and their final (compensated) values come back in ``meta["kept_values"]`` (float32, the order of
    ``keep.nonzero()``); the codes at those positions are placeholders.

    ``fmt`` ``mxfp4``/``nvfp4``: columns go onto the E2M1 grid (``ptqbench.fp4``; ``bits``/``sym`` unused) with block
    scales fitted on ``w`` before the pass (``scale_search``), so blocks stay contiguous in the original column order
    (the layout FP4 hardware reads) whatever the processing order; returns an ``FP4Weight``.
    """
    w = w.detach().clone().float()  # (out, in)
    h = h.detach().clone().float()  # (in, in)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    maxq = qmax(bits)
    comp = comp or Compensation()
    d = comp.asym.detach().clone().float() if comp.asym is not None else None  # (in, in)
    w0 = comp.w_orig.detach().clone().float() if comp.w_orig is not None else None  # (out, in)
    kp = keep.clone().bool() if keep is not None else None  # (out, in)

    dead = torch.diag(h) == 0  # inputs never active: any value works, pick 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if d is not None:
        d[:, dead] = 0
    if w0 is not None:
        w0[:, dead] = 0

    fp4 = fmt != "int"
    if fp4:
        if comp.asym is not None or comp.w_orig is not None or kp is not None:
            raise ValueError("gptq_quantize: FP4 grids take GPTQ's own update only (no compensation terms, no kept weights)")
        ts = tensor_scale(w, fmt)
        gs = FP4_GROUP[fmt]
        fp4_stored = block_scales(w.reshape(out_f, in_f // gs, gs), fmt, scale_search, ts)[..., 0]  # (out, blocks)
        fp4_eff = fp4_stored * ts

    def ranged(cols: torch.Tensor, c0: int) -> torch.Tensor:  # kept weights leave the range (0 is in it anyway)
        return cols if kp is None else cols.masked_fill(kp[:, c0: c0 + cols.shape[1]], 0)

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups and not fp4:  # ranges over the original, contiguous groups
        static = [compute_qparams(ranged(w[:, g: g + gs], g), bits, sym) for g in range(0, in_f, gs)]

    perm = torch.arange(in_f, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        d = d[perm][:, perm] if d is not None else None
        w0 = w0[:, perm] if w0 is not None else None
        kp = kp[:, perm] if kp is not None else None
    inv_perm = torch.argsort(perm)

    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    with few_threads(w):  # small factorizations: one thread avoids hand-off stalls on a busy CPU
        hinv = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(hinv)
        hinv = torch.linalg.cholesky(hinv, upper=True)  # (in, in) upper Cholesky factor of H⁻¹
    rc = comp.rescomp if d is not None else 0.0
    pm = comp.alpha * (d @ hinv.T).triu_(1) @ hinv if d is not None and not rc else None  # (in, in) GPTAQ's P
    # ResComp: R = rc·triu((D + H)·Uᵀ, 1)·U has the closed form rc·(B + I − diag(U)⁻¹·U) with B = triu(D·Uᵀ, 1)·U
    # (H·Uᵀ = U⁻¹ up to a diagonal-times-lower part, which triu(·, 1) drops), so R's terms fold into P's row and
    # GPTQ's row: one (in, in) product pair and one rank-1 update fewer per column, same result in exact arithmetic
    bm = (d @ hinv.T).triu_(1) @ hinv if rc else None  # (in, in) B
    beta = comp.first_order if w0 is not None else 0.0
    latent = comp.latent_outer

    codes = torch.zeros_like(w)  # (out, in) in processing order
    g_idx = torch.zeros(in_f, dtype=torch.long, device=w.device)  # processing position -> group
    kept_vals = torch.zeros_like(w) if kp is not None else None
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = torch.empty(0)
    with few_threads(w):
        for i1 in range(0, in_f, blocksize):
            i2 = min(i1 + blocksize, in_f)
            w1 = w[:, i1:i2].clone()  # (out, block)
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            lat1 = torch.zeros_like(w1) if latent else None  # latent columns, clamped to their grid range
            for i in range(i2 - i1):
                col = i1 + i
                if fp4:  # E2M1 with the block's fixed scale; GPTQ's own update below
                    wc = w1[:, i]
                    sc = fp4_eff[:, int(perm[col]) // gs]
                    v = e2m1_round(wc / sc)  # (out,) grid values; encoded once after the loop
                    codes[:, col] = v
                    err = (wc - v * sc) / hinv1[i, i]
                    w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)
                    err1[:, i] = err
                    continue
                if static_groups:
                    gi = int(perm[col]) // gs
                    scale, zero = static[gi]
                else:
                    if col % gs == 0:  # a new group starts: its range from the current (updated) columns
                        group = w1[:, i: i + gs]
                        if col + gs > i2:  # the group runs past this block
                            group = torch.cat([group, w[:, i2: col + gs]], dim=1)
                        scale, zero = compute_qparams(ranged(group, col), bits, sym)
                        scales.append(scale)
                        zeros.append(zero)
                    gi = col // gs
                g_idx[col] = gi
                wc = w1[:, i]
                q = torch.clamp(torch.round(wc / scale) + zero, 0, maxq)
                codes[:, col] = q
                deq = (q - zero) * scale
                if kp is not None:  # kept weights: exact, no error to spread
                    kc = kp[:, col]
                    deq = torch.where(kc, wc, deq)
                    kept_vals[:, col] = torch.where(kc, wc, 0.0)
                if beta:  # FOEM: the first-order term enters the error and pulls the rest of the block back
                    err = ((wc - deq) - beta * (wc - w0[:, col])) / hinv1[i, i]
                else:
                    err = (wc - deq) / hinv1[i, i]
                if pm is None and bm is None and not beta:  # plain GPTQ
                    w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # spread the error onto the later columns
                else:
                    if lat1 is not None:
                        lat1[:, i] = torch.maximum(torch.minimum(wc, (maxq - zero) * scale), -zero * scale)
                    if bm is not None:  # err⊗U − α·w⊗P/α − r⊗R with r = w_orig − w, R in closed form
                        r = w0[:, col] - wc
                        upd = torch.outer(err + r * (rc / hinv1[i, i]), hinv1[i, i:])
                        upd.addr_(comp.alpha * wc + rc * r, bm[col, col: i2], alpha=-1)
                        upd[:, 0].sub_(r, alpha=rc)  # R's identity part: column i's update stays err·U[i, i]
                    else:
                        upd = torch.outer(err, hinv1[i, i:])
                    if pm is not None:
                        upd.addr_(wc, pm[i1 + i, i1 + i: i2], alpha=-1)
                    if beta and comp.pullback == "block":  # (column i is done: its entry does not matter)
                        upd.add_(w1[:, i:] - w0[:, col: i2], alpha=beta)
                    elif beta and col + 1 < i2:
                        upd[:, 1].add_(w1[:, i + 1] - w0[:, col + 1], alpha=beta)
                    if latent:  # the column keeps its latent value; the update goes to the later ones
                        w1[:, i + 1:].sub_(upd[:, 1:])
                    else:
                        w1[:, i:].sub_(upd)
                err1[:, i] = err
            if pm is None and bm is None and not beta:  # plain GPTQ
                w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # lazy update of the columns after this block
                continue
            op = lat1 if lat1 is not None else w1
            if bm is not None:  # the block's R terms folded as in the column update (identity part: inside the block)
                r1 = w0[:, i1:i2] - op  # (out, block)
                tail_upd = (err1 + r1 * (rc / torch.diagonal(hinv1))) @ hinv[i1:i2, i2:]
                tail_upd.addmm_(comp.alpha * op + rc * r1, bm[i1:i2, i2:], alpha=-1)
            else:
                tail_upd = err1 @ hinv[i1:i2, i2:]
            if pm is not None:
                tail_upd.addmm_(op, pm[i1:i2, i2:], alpha=-1)
            w[:, i2:].sub_(tail_upd)

    if fp4:
        return fp4_weight(e2m1_encode(codes[:, inv_perm]), fp4_stored, fmt, ts)
    if static_groups:
        scales = [s for s, _ in static]
        zeros = [z for _, z in static]
    s = torch.stack(scales, 1)  # (out, n_groups)
    z = torch.stack(zeros, 1)  # (out, n_groups)
    codes = codes[:, inv_perm]
    g_orig = g_idx[inv_perm]  # (in,) group of each original column
    qw = QuantizedWeight(codes.to(torch.uint8).cpu(), s.to(torch.float16).cpu(), z.to(torch.uint8).cpu(), bits,
                         group_size, g_orig.to(torch.int32).cpu(), sym, meta={"act_order": act_order})
    if kp is not None:
        qw.meta["kept_values"] = kept_vals[:, inv_perm][keep.bool()].cpu()
    return qw


@register_stage
class GPTQ(Rounding):
    """GPTQ (Frantar et al., 2023): second-order error compensation, layer by layer on calibration data.

    Descendants (GPTAQ, residual-aware compensation, FOEM) override ``statistics`` (what is gathered per
    shared-input group) and ``compensation`` (the extra update terms); the loop stays here.
    """

    name = "gptq"
    supported_formats = FORMATS  # FP4 grids through the same column loop (``gptq_quantize(fmt=...)``)
    family = "compensation"
    config_cls = GPTQConfig
    requires_calibration = True
    needs_loop = True
    paper = "https://arxiv.org/abs/2210.17323"
    config: GPTQConfig

    def statistics(self, ctx: LayerContext, group: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per linear of a shared-input group: its Hessian (in, in) and any extra statistic (GPTAQ's ΔXᵀX)."""
        return {n: (h, None) for n, h in ctx.hessians(group).items()}

    def compensation(self, name: str, w: torch.Tensor, extra: torch.Tensor | None) -> Compensation | None:
        """The update terms beyond GPTQ's for the linear ``name`` whose weight (out, in) is about to be rounded."""
        return None

    def round_linear(self, ctx: LayerContext, name: str, w: torch.Tensor, h: torch.Tensor,
                     extra: torch.Tensor | None) -> QuantizedWeight:
        """Round one linear's weight ``w`` (out, in) with its Hessian ``h`` (in, in) (GWQ adds its outliers here)."""
        c, sch = self.config, self.scheme
        if sch.w_format != "int":
            return gptq_quantize(w, h, sch.w_bits, sch.group_size, sch.sym, c.percdamp, c.blocksize, c.act_order,
                                 fmt=sch.w_format, scale_search=self.fp4_scale_search())
        return gptq_quantize(w, h, sch.w_bits, sch.group_size, sch.sym, c.percdamp, c.blocksize, c.act_order,
                             c.static_groups, comp=self.compensation(name, w, extra))

    def fp4_scale_search(self) -> str:
        """How FP4 block scales are chosen: the scheme's ``scale_search`` (MR-GPTQ overrides it)."""
        return self.scheme.scale_search

    def quantize_layer(self, ctx: LayerContext, rng: RangeStage) -> dict[str, QuantizedWeight]:
        if self.needs_fp_inputs:
            ctx.snapshot_fp()  # before any weight of this layer changes
        targets = set(ctx.targets)
        groups = [[n for n in g if n in targets] for g in ctx.groups()]
        groups = [g for g in groups if g]
        if not self.config.true_sequential:  # all Hessians from the full-precision layer at once
            groups = [[n for g in groups for n in g]]
        linears = ctx.linears
        out: dict[str, QuantizedWeight] = {}
        stats = InputStats(ctx, self.scheme.group_size)
        for group in groups:
            st = self.statistics(ctx, group)
            stats.add_hessians({n: h for n, (h, _) in st.items()})
            for name in group:
                lin = linears[name]
                w = rng.prepare(name, lin.weight.data, stats)
                qw = self.round_linear(ctx, name, w, *st[name])
                set_linear_weight(lin, qw)
                out[name] = qw
        return out
