"""``hqq`` range: HQQ — Half-Quadratic Quantization of Large Machine Learning Models.

Badri and Shaji, Mobius Labs, 2023, https://mobiusml.github.io/hqq_blog/ (reference code: github.com/mobiusml/hqq).
The alias ``hqq`` is the recipe ``none+hqq+nearest``.

Calibration-free. Starting from the min-max grid of each group, HQQ keeps the scale fixed and optimizes the zero
point to minimise an ``lp`` (``p < 1``) norm of the weight error, which fits the heavy-tailed error of rounding
better than the squared error. The non-convex problem is split half-quadratically with an auxiliary error variable
``W_e`` and solved by alternating closed forms:

    W_e  ← shrink_p(W - W_r, β)                     generalised soft-thresholding (the ``lp`` proximal step)
    zero ← mean_group(W_q - (W - W_e) · s⁻¹)        the zero that best explains W - W_e on the fixed codes
    β    ← κ · β

with ``W_q = clamp(round(W/s + zero))`` and ``W_r = (W_q - zero)·s``. Paper/reference defaults kept: ``p = 0.7``,
``β = 10``, ``κ = 1.01``, 20 iterations, early stop as soon as the mean absolute error stops decreasing (one error
for the whole linear), fp32 on CPU. The range starts from each group's raw min and max (not widened to include 0).

Storage (documented): the optimized zero is fractional, so it is stored as float16 (``QuantizedWeight.zeros`` is
fp16, ``meta["zero_dtype"] = "fp16"``) and counted at 16 bits through ``extra_bits`` (the shared accounting counts
``bits`` per zero). The scale and zero are rounded to fp16 before the final codes are computed, so the codes are
exactly the nearest ones for the stored parameters. The packed kernels (``ptqbench.kernels``) pack integer zeros
only, so HQQ weights are marked ``meta["packed_kernels"] = False``: packing refuses them (the packed evaluator
reports skipped) and memory accounting counts ``storage_bits`` (16-bit zeros) instead.

As a range stage, HQQ's zero is fitted together with nearest rounding of the weight as it is: it works with the
``nearest`` rounding only (a GPTQ rounding would rewrite the weight the zero was fitted to; the recipe refuses it).

Deviations: the early stop keeps the best iterate (the reference's v2 solver); the legacy solver returns the zero
of the step that made the error worse. The reference's optional 8-bit meta-quantization of zeros/scales
(``quant_zero``/``quant_scale``) is not done. Groups run along the input features of each output row (our shared
format); the reference code's default ``axis=0`` groups along the other dimension of its reshaped view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.errors import ConfigError
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import QuantizedWeight, QuantScheme, group_index, qmax
from ptqbench.stages import RangeStage, register_stage


@dataclass
class HQQConfig(MethodConfig):
    lp_norm: float = 0.7  # p of the lp error norm (p < 1: sparsity-promoting; 1: soft-thresholding)
    beta: float = 10.0  # initial half-quadratic penalty
    kappa: float = 1.01  # β grows by this factor each iteration
    iters: int = 20  # maximum iterations
    early_stop: bool = True  # stop when the mean absolute error stops decreasing (keep the best iterate)

    def __post_init__(self) -> None:
        if not 0.0 < self.lp_norm <= 1.0:
            raise ConfigError(f"hqq.lp_norm={self.lp_norm}: use p in (0, 1] (paper: 0.7)")
        if self.beta <= 0:
            raise ConfigError(f"hqq.beta={self.beta}: use a positive penalty (paper: 10)")
        if self.kappa <= 1.0:
            raise ConfigError(f"hqq.kappa={self.kappa}: use a growth factor > 1 (paper: 1.01)")
        if self.iters < 1:
            raise ConfigError(f"hqq.iters={self.iters}: use at least 1 iteration (paper: 20)")
        super().__post_init__()


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal step of ``|x|^p / β``: ``sign(x)·relu(|x| - |x|^(p-1)/β)`` (soft-thresholding when p = 1)."""
    ax = x.abs()
    if p == 1.0:
        return torch.sign(x) * torch.relu(ax - 1.0 / beta)
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-8).pow(p - 1) / beta)


@torch.no_grad()
def hqq_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, lp_norm: float = 0.7,
             beta: float = 10.0, kappa: float = 1.01, iters: int = 20, early_stop: bool = True
             ) -> tuple[torch.Tensor, int]:
    """Optimized zero (rows, 1) for ``w`` (rows, group) with fixed ``scale`` (rows, 1) (our convention
    ``w ≈ (q - zero)·scale``); returns it and the number of iterations run.

    The zero update ``mean(q - (w - W_e)/s)`` is computed as ``mean(q) - (mean(w) - mean(W_e))/s`` and the
    elementwise steps run in place: this loop is the whole cost of the method.
    """
    w = w.float()
    inv = 1.0 / scale  # HQQ works with the inverse scale: q = round(w·inv + zero)
    w_mean = w.mean(dim=1, keepdim=True)
    maxq = qmax(bits)
    best_err, best_zero = float("inf"), zero.clone()
    it = 0
    for it in range(1, iters + 1):
        q = torch.mul(w, inv).add_(zero).round_().clamp_(0, maxq)  # codes
        d = q.sub(zero).mul_(scale).sub_(w).neg_()  # w - W_r
        ad = d.abs()
        err = float(ad.mean())
        if early_stop:
            if err < best_err:
                best_err, best_zero = err, zero
            else:
                break
        # W_e = shrink_p(d, β), in place on |d|
        thr = ad.clamp_min(1e-8).pow_(lp_norm - 1).div_(beta) if lp_norm != 1.0 else 1.0 / beta
        w_e = torch.copysign(ad.sub_(thr).relu_(), d)
        zero = q.mean(dim=1, keepdim=True) - (w_mean - w_e.mean(dim=1, keepdim=True)) * inv
        beta *= kappa
    return (best_zero if early_stop else zero), it


@torch.no_grad()
def hqq_quantize(w: torch.Tensor, bits: int, group_size: int, lp_norm: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, iters: int = 20, early_stop: bool = True) -> QuantizedWeight:
    """HQQ on one weight ``w`` (out, in): fp16 scales and fp16 (fractional) zeros per (row, group)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ConfigError(f"hqq needs group_size dividing in_features={in_f}: use quant.partial_group=false")
    ng = in_f // gs
    wg = w.float().reshape(out_f * ng, gs)  # (out · n_groups, gs)
    maxq = qmax(bits)
    lo, hi = wg.amin(dim=1, keepdim=True), wg.amax(dim=1, keepdim=True)
    scale = ((hi - lo) / maxq).clamp_min(1 / 2e4)  # (rows, 1); the reference caps the inverse scale at 2e4
    zero = -lo / scale
    zero, iters_run = hqq_zero(wg, scale, zero, bits, lp_norm, beta, kappa, iters, early_stop)
    scale16, zero16 = scale.half(), zero.half()  # what is stored; codes are computed for exactly these
    q = torch.clamp(torch.round(wg / scale16.float() + zero16.float()), 0, maxq)
    qw = QuantizedWeight(
        q.reshape(out_f, in_f).to(torch.uint8).cpu(), scale16.reshape(out_f, ng).cpu(), zero16.reshape(out_f, ng).cpu(),
        bits, group_size, group_index(in_f, group_size).to(torch.int32), sym=False,
        extra_bits=out_f * ng * (16 - bits), meta={"zero_dtype": "fp16", "packed_kernels": False, "hqq_iters": iters_run})
    return qw


@register_stage
class HQQ(RangeStage):
    """HQQ (Badri & Shaji, 2023): calibration-free zero-point optimization with an lp (p<1) error norm."""

    name = "hqq"
    family = "calibration-free"
    config_cls = HQQConfig
    roundings = ("nearest",)
    supported_a_bits = (16,)
    paper = "https://mobiusml.github.io/hqq_blog/"
    config: HQQConfig

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._iters: list[int] = []

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        if scheme.sym:
            raise ConfigError("the hqq range optimizes the zero point, so it needs an asymmetric scheme: set "
                              "quant.sym=false")

    def nearest(self, name: str, w: torch.Tensor) -> QuantizedWeight:
        c, sch = self.config, self.scheme
        qw = hqq_quantize(w, sch.w_bits, sch.group_size, c.lp_norm, c.beta, c.kappa, c.iters, c.early_stop)
        self._iters.append(qw.meta["hqq_iters"])
        return qw

    def info(self) -> dict[str, float]:
        return {"mean_iters": sum(self._iters) / len(self._iters)} if self._iters else {}
