"""``pbllm``: PB-LLM — Partially Binarized Large Language Models (post-training, GPTQ variant).

Shang, Yuan, Wu, Dong, ICLR 2024, https://arxiv.org/abs/2310.00034.

A binarization method: a small fraction of salient weights (default 10%) is kept at 8 bits, every other weight is
binarized to ``±α`` with the L2-optimal scale ``α = mean|w|`` over the non-salient weights of its row (of its
group of columns when the scheme has groups), and, as in GPTQ, each column's quantization error is spread onto the
columns not yet quantized with the inverse Hessian ``H = 2XᵀX`` of the layer's calibration inputs (the paper's
PB-GPTQ). Salient weights are chosen once per linear before the column pass by the Hessian-based saliency
``w_ij² / [U]_jj²`` (``U``: the upper Cholesky factor of ``H⁻¹``, whose diagonal is what GPTQ divides the error by;
the paper writes it as ``[H⁻¹]_jj``), taking exactly ``round(fraction · out · in)`` weights with the highest score
over the whole matrix. Salient weights use a per-row asymmetric 8-bit min-max grid over the row.

Storage (``QuantResult.effective_bits`` is honest): one bit per non-salient weight, ``salient_bits`` per salient
weight, a 1-bit salient bitmap over all weights, an fp16 ``α`` per (row, group) and the salient grid's fp16 scale
and 8-bit zero per row: about 2.8 bits per weight at the defaults with per-row ``α``. The paper counts only the
weights themselves, ``(1 - f)·1 + f·8 = 1.7`` bits at ``f = 0.1``; that figure is recorded as
``info:effective_bits_paper`` next to the honest ``effective_bits`` row.

The format is not the harness's uniform-code format: ``PartialBinaryWeight`` (a ``QuantizedWeight`` subclass)
holds the 1-bit codes in ``qweight`` (``bits=1``, ``scales`` = α, ``sym=True``), plus the salient bitmap and the
salient weights' 8-bit codes and row grid; its ``dequantize()`` returns exactly the weight the model uses. The
packed kernels (``ptqbench.kernels``) do not support this format.

The scheme: ``quant.w_bits`` must be 2 (PB-LLM is compared in the 2-bit class; the binary and salient widths are
the method's own), ``quant.group_size`` sets the α groups (the paper's default is per row: ``quant.group_size=-1``;
with groups the salient weights are still chosen over the whole matrix), weight-only (``a_bits=16``).

Paper defaults kept: 10% salient weights at 8 bits, Hessian saliency, GPTQ dampening 1% and 128-column lazy
blocks, natural column order. Deviations (documented): the reference code's binarizer subtracts each row's mean
before taking signs (one more fp16 per row); this file binarizes ``w`` itself (``α·sign(w)``, the paper's
equation); ``α`` and the salient grids are fixed from the weights before the column pass, as the reference code
calibrates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptqbench.errors import ConfigError
from ptqbench.pipeline import LayerContext, LayerwiseQuantizer
from ptqbench.quantizer import MethodConfig, QuantResult, register, set_linear_weight
from ptqbench.scheme import QuantizedWeight, group_index, qmax


@dataclass
class PBLLMConfig(MethodConfig):
    salient_fraction: float = 0.1  # fraction of weights kept at salient_bits (paper: 10%)
    salient_bits: int = 8  # bits of the salient weights (paper: 8)
    percdamp: float = 0.01  # GPTQ dampening, fraction of the mean Hessian diagonal
    blocksize: int = 128  # GPTQ lazy batch-update block (columns)

    def __post_init__(self) -> None:
        if not 0 < self.salient_fraction < 1:
            raise ConfigError(f"pbllm.salient_fraction={self.salient_fraction}: use a value in (0, 1) "
                              f"(paper: 0.1)")
        if not 2 <= self.salient_bits <= 8:
            raise ConfigError(f"pbllm.salient_bits={self.salient_bits}: use 2-8 (paper: 8)")
        if not 0 < self.percdamp < 1:
            raise ConfigError(f"pbllm.percdamp={self.percdamp}: use a value in (0, 1), GPTQ uses 0.01")
        if self.blocksize < 1:
            raise ConfigError(f"pbllm.blocksize={self.blocksize}: use a positive number of columns (GPTQ: 128)")
        super().__post_init__()


@dataclass
class PartialBinaryWeight(QuantizedWeight):
    """PB-LLM's format: 1-bit codes (``qweight``, 1 = +α) with ``α`` in ``scales`` (out, n_groups), and the salient
    weights' bitmap, ``salient_bits`` codes and per-row asymmetric grid (``w = (q - zero)·scale`` there)."""

    salient_mask: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))  # (out, in)
    salient_codes: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))  # (out, in)
    salient_scales: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (out,) fp16
    salient_zeros: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))  # (out,)
    salient_bits: int = 8

    def dequantize(self) -> torch.Tensor:
        alpha = self.scales.float()[:, self.g_idx.long()]  # (out, in)
        binary = torch.where(self.qweight.bool(), alpha, -alpha)
        sal = (self.salient_codes.float() - self.salient_zeros.float()[:, None]) * self.salient_scales.float()[:, None]
        return torch.where(self.salient_mask, sal, binary)


def _storage_extra(out_f: int, in_f: int, n_salient: int, salient_bits: int) -> int:
    """Bits beyond ``out·in·1`` codes + fp16 α (the base accounting): salient codes, the bitmap and the salient
    row grids, less the binary codes that salient positions do not need."""
    return n_salient * salient_bits + out_f * in_f + out_f * (16 + salient_bits) - n_salient


def binary_scale(w: torch.Tensor, keep: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """L2-optimal ``α`` (out, n_groups) for ``α·sign(w)`` over the entries where ``keep`` (out, in) is true:
    ``argmin_α Σ (w - α·sign(w))² = mean|w|``."""
    a = (w.abs() * keep).float()  # (out, in)
    idx = g_idx.long()[None, :].expand_as(a)
    s = torch.zeros(w.shape[0], n_groups, device=w.device).scatter_add_(1, idx, a)
    n = torch.zeros(w.shape[0], n_groups, device=w.device).scatter_add_(1, idx, keep.float())
    return s / n.clamp_min(1)


@torch.no_grad()
def pbllm_quantize(w: torch.Tensor, h: torch.Tensor, salient_fraction: float = 0.1, salient_bits: int = 8,
                   group_size: int = -1, percdamp: float = 0.01, blocksize: int = 128) -> PartialBinaryWeight:
    """PB-GPTQ on one weight ``w`` (out, in) with Hessian ``h`` (in, in)."""
    w = w.detach().clone().float()  # (out, in)
    h = h.detach().clone().float()  # (in, in)
    out_f, in_f = w.shape
    dead = torch.diag(h) == 0  # inputs never active: any value works, pick 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (in, in)

    # salient weights: exactly round(f · numel) highest w² / U_jj² over the matrix
    saliency = w.pow(2) / torch.diag(u).pow(2)[None, :]  # (out, in)
    k = int(round(salient_fraction * w.numel()))
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.topk(saliency.flatten(), k).indices] = True
    mask = mask.view(out_f, in_f)

    g_idx = group_index(in_f, group_size, w.device)
    n_groups = int(g_idx[-1]) + 1
    alpha = binary_scale(w, ~mask, g_idx, n_groups).to(torch.float16).float()  # (out, n_groups), as stored
    alpha_col = alpha[:, g_idx]  # (out, in)
    # salient grid: per-row asymmetric min-max over the row (range contains 0), stored in fp16 / uint8
    maxs = qmax(salient_bits)
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    s_scale = ((hi - lo) / maxs).clamp_min(1e-8).to(torch.float16).float().clamp_min(6e-8)  # (out,)
    s_zero = torch.round(-lo / s_scale).clamp(0, maxs)  # (out,)

    qdq = torch.zeros_like(w)  # (out, in) the PB-LLM weight, column by column
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = w[:, i1:i2].clone()  # (out, block)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            wc = w1[:, i]
            sal = (torch.clamp(torch.round(wc / s_scale) + s_zero, 0, maxs) - s_zero) * s_scale
            a = alpha_col[:, col]
            q = torch.where(mask[:, col], sal, torch.where(wc >= 0, a, -a))  # sign(0) taken as +
            qdq[:, col] = q
            err = (wc - q) / u1[i, i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1)  # rank-1 update (much faster than a broadcast -=)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy update of the columns after this block

    # codes from the final values: binary ones are ±α (code 1 = +), salient ones lie exactly on their grid
    bin_codes = (qdq >= 0).to(torch.uint8)
    sal_codes = torch.clamp(torch.round(qdq / s_scale[:, None]) + s_zero[:, None], 0, maxs).to(torch.uint8)
    sal_codes = torch.where(mask, sal_codes, torch.zeros_like(sal_codes))
    return PartialBinaryWeight(
        bin_codes.cpu(), alpha.to(torch.float16).cpu(), torch.zeros(out_f, n_groups, dtype=torch.uint8), 1,
        group_size, g_idx.to(torch.int32).cpu(), sym=True,
        extra_bits=_storage_extra(out_f, in_f, k, salient_bits),
        meta={"format": "pbllm", "packed_kernels": False, "salient_fraction": k / w.numel()},
        salient_mask=mask.cpu(), salient_codes=sal_codes.cpu(), salient_scales=s_scale.to(torch.float16).cpu(),
        salient_zeros=s_zero.to(torch.uint8).cpu(), salient_bits=salient_bits)


@register
class PBLLM(LayerwiseQuantizer):
    """PB-LLM (Shang et al., 2024): 10% salient weights at 8 bits, the rest binarized, GPTQ error compensation."""

    name = "pbllm"
    family = "binarization"
    config_cls = PBLLMConfig
    requires_calibration = True
    supported_w_bits = (2,)  # the comparison class; binary + salient widths are the method's own (docstring)
    supported_a_bits = (16,)
    paper = "https://arxiv.org/abs/2310.00034"
    config: PBLLMConfig

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        targets = set(ctx.targets)
        groups = [[n for n in g if n in targets] for g in ctx.groups()]
        linears = ctx.linears
        c = self.config
        out: dict[str, QuantizedWeight] = {}
        for group in (g for g in groups if g):  # true-sequential, as GPTQ: each group on the quantized parts' output
            hs = ctx.hessians(group)
            for name in group:
                lin = linears[name]
                qw = pbllm_quantize(lin.weight.data, hs[name], c.salient_fraction, c.salient_bits,
                                    self.scheme.group_size, c.percdamp, c.blocksize)
                set_linear_weight(lin, qw)
                out[name] = qw
        return out

    def quantize(self, model: torch.nn.Module, calibration: object) -> QuantResult:
        result = super().quantize(model, calibration)
        f, b = self.config.salient_fraction, self.config.salient_bits
        result.info["effective_bits_paper"] = (1 - f) * 1 + f * b  # the paper's count: weights only
        result.info["salient_fraction"] = f
        return result
