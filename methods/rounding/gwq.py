"""``gwq`` rounding: GWQ — Gradient-Aware Weight Quantization for Large Language Models.

Shao et al., 2024, https://arxiv.org/abs/2411.00850. ``method=gwq`` is the recipe ``none+minmax+gwq``.

The gradient of the language-model loss on a calibration sample says which weights the loss is most sensitive to:
the top 1% of each linear by ``|∂L/∂w|`` stay in fp16 (a sparse matrix: values + indices), every other weight is
quantized, here with GPTQ's error compensation (``gptq_quantize(..., keep=mask)``: the kept weights leave their
group's min-max range and take no rounding error; the errors of the others are spread onto the columns after them,
kept weights included, whose compensated values are what is stored). The paper argues that gradients locate the
sensitive weights better than the Hessian does (SpQR); ``salience=hessian`` is that baseline with the same budget.

- ``salience=gradient`` (the paper): next-token cross-entropy of the full-precision model (after any model-level
  transform) on the first ``grad_samples`` calibration windows (the paper: one sample), one backward pass; the
  score of ``w_ij`` is ``|∂L/∂w_ij|`` of the mean loss. Taken once, before the layer loop (``prepare_model``).
- ``salience=hessian`` (SpQR, https://arxiv.org/abs/2306.03078, its reference code's leave-one-out criterion): the
  drop in the group's Hessian-weighted error ``Σ ((w - q(w)) / U_jj)²`` when ``w_ij`` leaves the group's min-max
  range and is kept exactly (``U``: upper Cholesky factor of the damped ``H⁻¹``, in GPTQ's column order): its own
  error for most weights, plus the whole group's gain when it is the group's min or max.
- The budget is per linear: exactly ``round(outlier_fraction · out · in)`` weights, the highest scores.

Storage (``SparseOutlierWeight``, honest ``effective_bits``): the dense part is the harness's uniform format (a
``bits``-bit code for every position, fp16 scales, ``bits``-bit zeros; outlier positions hold their group's zero
code, so the dense part is exactly 0 there), plus the outliers in CSR: fp16 value + 16-bit column index per outlier
(32-bit when ``in > 65536``) and ``out + 1`` 32-bit row pointers: at W3 g64 with 1% outliers GPTQ's 3.30 bits per
weight + 0.32 (values, indices) + ~0.05 (row pointers) = 3.66 on SmolLM2.

Kernels: the packed evaluator (``eval=latency``'s ``packed`` section) runs ``SparseOutlierLinear``: the dense part as
``QuantLinear`` (Triton on a GPU, torch elsewhere) plus the fp16 outliers added in torch. The latency section times
the uniform dense kernel only (no sparse add).

Defaults: the paper's 1% outliers, fp16 values, one gradient sample; GPTQ as in this harness (``percdamp=0.01``,
``blocksize=128``, ``act_order=true``, true-sequential), so ``gwq`` and ``gptq`` differ only by the outliers.
Deviations (documented): the method section of the paper was not reachable (only its abstract and summaries: one
calibration sample, top 1% by gradient kept in fp16, the rest group-wise low-bit); the score ``|g|`` per weight,
the per-linear budget and GPTQ for the non-outliers are this file's reading. The window length is the calibration
set's (``calib.seq_len``). Outliers are stored in fp16 after GPTQ compensated them in fp32 (error ≤ 2⁻¹¹ relative,
not fed back). The hessian baseline takes SpQR's score once before the GPTQ pass (SpQR re-scores each column on the
updated weights) and a fixed budget instead of SpQR's threshold, so both variants keep the same number of weights.
A layer-level transform (``awq``) rescales weights after the gradient was taken: ``salience=gradient`` refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.methods.rounding.gptq import GPTQ, GPTQConfig, gptq_quantize
from ptqbench.models import layers_prefix, linear_layers
from ptqbench.pipeline import LayerContext, target_linears
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import QuantizedWeight, QuantScheme, compute_qparams, dequantize_weight, fake_quantize
from ptqbench.stages import register_stage


SALIENCES = ("gradient", "hessian")


@dataclass
class GWQConfig(GPTQConfig):
    """GPTQ's parameters (the non-outliers go through GPTQ) and the outlier choice."""

    salience: str = "gradient"  # "gradient" (the paper: |dL/dw|) or "hessian" (SpQR's leave-one-out score)
    outlier_fraction: float = 0.01  # weights kept in fp16 per linear (paper: 1%)
    grad_samples: int = 1  # calibration windows in the gradient pass (paper: one sample)

    def __post_init__(self) -> None:
        if self.salience not in SALIENCES:
            raise ConfigError(f"gwq.salience={self.salience!r}: use 'gradient' (the paper) or 'hessian' (SpQR-style)")
        if not 0 <= self.outlier_fraction < 1:
            raise ConfigError(f"gwq.outlier_fraction={self.outlier_fraction}: use a value in [0, 1) (paper: 0.01)")
        if self.grad_samples < 1:
            raise ConfigError(f"gwq.grad_samples={self.grad_samples}: use at least 1 window (paper: 1)")
        super().__post_init__()


# ------------------------------------------------------------------------------------------------ salience
def loss_gradients(model: nn.Module, input_ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``∂L/∂W`` (out, in) of the named linears for the mean next-token cross-entropy over ``input_ids`` (n, seq),
    one window per backward (memory of one sample); the model's flags, grads and mode are restored."""
    mods = linear_layers(model)
    weights = [mods[n].weight for n in names]
    if not weights:
        return {}
    if torch.is_inference_mode_enabled() or any(p.is_inference() for p in weights):
        raise ConfigError("gwq: salience=gradient needs autograd, and the model is in inference mode: quantize "
                          "outside torch.inference_mode(), or use method.params.rounding.salience=hessian")
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    device = weights[0].device
    try:
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for p in weights:
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for ids in input_ids.split(1):
                ids = ids.to(device)  # (1, seq)
                logits = model(input_ids=ids, use_cache=False).logits  # (1, seq, vocab)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                (loss / input_ids.shape[0]).backward()
        grads = {}
        for n, p in zip(names, weights):
            if p.grad is None:
                raise ConfigError(f"gwq: no gradient reached {n} (not on the loss path): use method.params."
                                  f"rounding.salience=hessian, or keep it in floating point (quant.keep_fp)")
            grads[n] = p.grad.detach()
        return grads
    finally:
        for p, req, grad in flags:
            p.requires_grad_(req)
            p.grad = grad
        model.train(was_training)


def top_fraction(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask (out, in) of exactly ``round(fraction · numel)`` highest entries of ``score`` (out, in)."""
    k = int(round(fraction * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[torch.topk(score.flatten().float(), k).indices] = True
    return mask.view_as(score)


def _weighted_err(g: torch.Tensor, d: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """``(w - q(w))² · d`` (out, n) for one group ``g`` (out, n) on its min-max grid; ``d`` (n,) column weights."""
    s, z = compute_qparams(g, bits, sym)
    return (g - fake_quantize(g, s, z, bits)).square() * d


def loo_scores(w: torch.Tensor, d: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """SpQR's leave-one-out score (out, in): how much the group's error ``Σ (w - q(w))²·d`` drops when one weight
    is kept exactly and the group's range is refit without it. Only a group's min or max moves its range, so the
    score is the weight's own error elsewhere, and for those two a refit with the weight set to 0 (inside every
    min-max range and exactly representable, so it adds no error)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    score = torch.empty_like(w)
    rows = torch.arange(out_f, device=w.device)
    for c0 in range(0, in_f, gs):
        g, dg = w[:, c0: c0 + gs], d[c0: c0 + gs]  # (out, n), (n,)
        err = _weighted_err(g, dg, bits, sym)  # (out, n)
        score[:, c0: c0 + gs] = err
        base = err.sum(1)  # (out,)
        for idx in (g.argmin(1), g.argmax(1)):  # (out,)
            g2 = g.clone()
            g2[rows, idx] = 0.0
            score[rows, c0 + idx] = base - _weighted_err(g2, dg, bits, sym).sum(1)
    return score


def hessian_salience(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                     percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False) -> torch.Tensor:
    """SpQR-style score (out, in) of ``w`` (out, in) with Hessian ``h`` (in, in): ``loo_scores`` with column weights
    ``1/U_jj²`` and groups as ``gptq_quantize`` forms them (``U``: upper Cholesky factor of the damped ``H⁻¹`` in
    GPTQ's column order, whose diagonal GPTQ divides each error by)."""
    w = w.detach().float().clone()  # (out, in)
    h = h.detach().float().clone()  # (in, in)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0], device=h.device)
    inv = torch.argsort(perm)
    hp = h[perm][:, perm]
    hp.diagonal().add_(percdamp * torch.mean(torch.diag(hp)))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)  # (in, in)
    d = torch.diag(u).pow(-2)  # (in,) in processing order
    if act_order and not static_groups:  # groups are runs of consecutive processed columns
        return loo_scores(w[:, perm], d, bits, group_size, sym)[:, inv]
    return loo_scores(w, d[inv], bits, group_size, sym)


# ------------------------------------------------------------------------------------------------ format
@dataclass
class SparseOutlierWeight(QuantizedWeight):
    """Dense low-bit codes (``qweight``; outlier positions hold their group's zero code, so 0) plus the fp16
    outliers in CSR: ``row_ptr`` (out + 1,) int32, ``col_idx`` (k,) int32 (stored as 16 bits when in ≤ 65536) and
    ``values`` (k,) fp16. ``w = (q - zero)·scale + S``."""

    row_ptr: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int32))
    col_idx: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float16))

    @classmethod
    def from_kept(cls, qw: QuantizedWeight, mask: torch.Tensor) -> "SparseOutlierWeight":
        """From ``gptq_quantize(..., keep=mask)``: its codes, and its ``kept_values`` (order of ``mask.nonzero()``)."""
        mask = mask.cpu().bool()  # (out, in)
        out_f, in_f = mask.shape
        zero_code = qw.zeros[:, qw.g_idx.long()]  # (out, in)
        rows, cols = mask.nonzero(as_tuple=True)
        row_ptr = torch.zeros(out_f + 1, dtype=torch.int64)
        row_ptr[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
        k = int(rows.numel())
        sparse_bits = k * (16 + index_bits(in_f)) + (out_f + 1) * 32
        values = qw.meta.get("kept_values", torch.empty(0)).to(torch.float16)
        meta = {**qw.meta, "format": "gwq", "packed_kernels": False, "outliers": k}
        meta.pop("kept_values", None)
        return cls(torch.where(mask, zero_code, qw.qweight), qw.scales, qw.zeros, qw.bits, qw.group_size, qw.g_idx,
                   qw.sym, qw.extra_bits + sparse_bits, meta, row_ptr.to(torch.int32), cols.to(torch.int32), values)

    def rows(self) -> torch.Tensor:
        """Row of each outlier (k,) int64, expanded from ``row_ptr``."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def dense(self) -> QuantizedWeight:
        """The uniform part, packable; its ``extra_bits`` still count the sparse outliers."""
        meta = {k: v for k, v in self.meta.items() if k != "packed_kernels"}
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.g_idx,
                               self.sym, self.extra_bits, meta)

    def dequantize(self) -> torch.Tensor:
        w = dequantize_weight(self.qweight, self.scales, self.zeros, self.g_idx.long())  # (out, in), 0 at outliers
        w[self.rows(), self.col_idx.long()] = self.values.float()
        return w

    def packed_module(self, bias: torch.Tensor | None = None, backend: str = "auto") -> nn.Module:
        """The packed path (``swap_to_quant_linear``): ``QuantLinear`` on the dense part + the sparse fp16 add."""
        from ptqbench.kernels.quant_linear import QuantLinear

        return SparseOutlierLinear(QuantLinear(self.dense(), bias, backend), self)


def index_bits(in_features: int) -> int:
    return 16 if in_features <= 2**16 else 32


class SparseOutlierLinear(nn.Module):
    """``y = QuantLinear(x) + x·Sᵀ``: the packed dense part, then the fp16 outliers gathered and added in torch."""

    def __init__(self, dense: nn.Module, w: SparseOutlierWeight) -> None:
        super().__init__()
        self.dense = dense
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("rows", w.rows().to(torch.int32))  # (k,)
        self.register_buffer("cols", w.col_idx.to(torch.int32))  # (k,)
        # fp16 values as their int16 bit pattern: model.to(dtype) would convert a floating buffer
        self.register_buffer("values_bits", w.values.to(torch.float16).contiguous().view(torch.int16))  # (k,)

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes  # the dense part's extra_bits count the outliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x)  # (..., out)
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        vals = self.values_bits.view(torch.float16).float()  # (k,)
        rows, cols = self.rows.long(), self.cols.long()
        add = torch.zeros(x2.shape[0], self.out_features, device=x.device)  # (tokens, out) fp32
        step = max(1, 2**24 // max(vals.numel(), 1))  # bound the (tokens, k) product
        for t0 in range(0, x2.shape[0], step):
            add[t0: t0 + step].index_add_(1, rows, x2[t0: t0 + step, cols].float() * vals)
        return y + add.view(*x.shape[:-1], self.out_features).to(y.dtype)


# ------------------------------------------------------------------------------------------------ the stage
@register_stage
class GWQ(GPTQ):
    """GWQ (Shao et al., 2024): the top 1% weights by loss gradient kept in fp16, the rest quantized with GPTQ."""

    name = "gwq"
    supported_formats = ("int",)  # its extra terms are derived and tested on the integer grid
    family = "salience/scaling"
    config_cls = GWQConfig
    paper = "https://arxiv.org/abs/2411.00850"
    config: GWQConfig

    def __init__(self, scheme: QuantScheme, config: MethodConfig | None = None) -> None:
        super().__init__(scheme, config)
        self.outliers: dict[str, torch.Tensor] = {}  # full linear name -> flat indices of its top-|g| weights
        self._seen: dict[str, float] = {}  # full linear name -> Σw² when its gradient was taken
        self._kept = self._total = 0

    @classmethod
    def check_combination(cls, stages: tuple[type, ...], config: MethodConfig) -> None:
        transform = stages[0]
        if getattr(config, "salience", None) == "gradient" and getattr(transform, "level", "none") == "layer":
            raise ConfigError(f"gwq with salience=gradient takes its gradients before the layer loop, and the "
                              f"{transform.name} transform rescales the weights inside it: use a model-level or no "
                              f"transform (quarot, smoothquant, none), or method.params.rounding.salience=hessian")

    def prepare_model(self, model: nn.Module, calibration: Any) -> None:
        if self.config.salience != "gradient":
            return
        n = self.config.grad_samples
        ids = calibration.input_ids
        if ids.shape[0] < n:
            raise ConfigError(f"gwq.grad_samples={n} but the calibration set has {ids.shape[0]} windows: use "
                              f"calib.n_samples >= {n} or a smaller method.params.rounding.grad_samples")
        prefix = layers_prefix(model) + "."
        names = [q for q in target_linears(model, self.scheme)[0] if q.startswith(prefix)]
        mods = linear_layers(model)
        for name, g in loss_gradients(model, ids[:n], names).items():
            k = int(round(self.config.outlier_fraction * g.numel()))
            self.outliers[name] = torch.topk(g.abs().flatten().float(), k).indices.cpu()
            self._seen[name] = float(mods[name].weight.detach().double().square().sum())

    def _gradient_mask(self, full: str, w: torch.Tensor) -> torch.Tensor:
        if full not in self.outliers:
            raise RuntimeError(f"gwq: no gradient salience for {full}: Recipe.prepare must run prepare_model first")
        now = float(w.detach().double().square().sum())
        if not math.isclose(now, self._seen[full], rel_tol=1e-9, abs_tol=1e-30):
            raise ConfigError(f"gwq: {full} changed after its gradient was taken (a layer-level transform such as awq "
                              f"rescales it): use a model-level or no transform, or salience=hessian")
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[self.outliers.pop(full).to(w.device)] = True
        return mask.view_as(w)

    def round_linear(self, ctx: LayerContext, name: str, w: torch.Tensor, h: torch.Tensor,
                     extra: torch.Tensor | None) -> QuantizedWeight:
        c, sch = self.config, self.scheme
        if c.salience == "gradient":
            mask = self._gradient_mask(f"{ctx.name}.{name}", ctx.linears[name].weight)
        else:
            mask = top_fraction(hessian_salience(w, h, sch.w_bits, sch.group_size, sch.sym, c.percdamp, c.act_order,
                                                 c.static_groups), c.outlier_fraction)
        qw = gptq_quantize(w, h, sch.w_bits, sch.group_size, sch.sym, c.percdamp, c.blocksize, c.act_order,
                           c.static_groups, keep=mask)
        sw = SparseOutlierWeight.from_kept(qw, mask)
        self._kept += sw.meta["outliers"]
        self._total += w.numel()
        return sw

    def info(self) -> dict[str, float]:
        if not self._total:
            return {}
        facts = {"gwq_outliers": float(self._kept), "gwq_outlier_fraction": self._kept / self._total}
        if self.config.salience == "gradient":
            facts["gwq_grad_samples"] = float(self.config.grad_samples)
        return facts
