"""``lwc`` range: OmniQuant's learnable weight clipping (LWC).

OmniQuant — Omnidirectionally Calibrated Quantization for Large Language Models.

Shao, Chen, Zhang, Xu, Zhao, Li, Zhang, Gao, Qiao, Luo, ICLR 2024, https://arxiv.org/abs/2308.13137. The alias
``omniquant`` is the recipe ``none+lwc+nearest`` (synonym of this stage: ``omniquant``).

An optimization method: learnable weight clipping (LWC). Each quantization group of each linear gets two clipping
factors, ``γ`` and ``β`` (parameterized through a sigmoid so they stay in (0, 1)), that shrink its range before the
uniform grid is built: ``max' = σ(γ)·max(w)``, ``min' = σ(β)·min(w)``, ``h = (max' - min') / (2^b - 1)``,
``z = round(-min' / h)``, ``ŵ = (clamp(round(w / h) + z, 0, 2^b - 1) - z)·h``. Rounding uses the straight-through
estimator, so the loss gradient reaches ``γ, β``. They are trained block by block (one decoder layer at a time)
with AdamW to minimize the mean squared error between the quantized block's output and the full-precision block's
output. As in the paper, the full-precision target of layer i is computed from the full-precision model's input to
layer i, while the quantized block is fed the output of the already quantized layers before it (``ctx.inputs`` of
the shared pipeline); this stage keeps the full-precision hidden states itself across layers.

Paper defaults: LWC learning rate 1e-2, weight decay 0, 20 epochs (40 for W2 in the released scripts), batch size
1, 128 × 2048-token WikiText-2 calibration windows, γ and β initialized to 4.0 (σ(4) ≈ 0.982), MSE loss, all the
linears of a block trained jointly. Symmetric schemes learn one factor per group on the absolute maximum.

As a range stage, the clipping is trained with nearest rounding (straight-through) of the weight as it is, so it
works with the ``nearest`` rounding only (GPTQ would rewrite the weight after the fit; the recipe refuses it). After
a layer-level transform (``awq``) it is trained on the transformed layer, which computes the same function.

Deviations (documented):

- CPU defaults: ``epochs=2`` and ``lr=1e-1`` (paper: 20 epochs at 1e-2; ``epochs <= 0`` is refused). With 32
  calibration windows that is 64 optimizer steps per block instead of the paper's 2560, and at 1e-2 the clipping
  logits cannot move far from their initial 4.0 in 64 Adam steps (each moves a logit by about ``lr``). Measured on
  SmolLM2-135M's first 3 layers (32 × 512 docs windows, relative output error on held-out windows): W2g64 RTN 0.64,
  lr 1e-2 0.60, 5e-2 0.38, 1e-1 0.32; W3g64 RTN 0.24, lr 1e-2 0.23, 5e-2 0.17, 1e-1 0.16. The paper's setting is
  ``method.params.range.epochs=20 method.params.range.lr=0.01``. One epoch costs about 0.4 s of one CPU core per
  512-token window per layer (forward + backward of the block).
- LWC only: no learnable equivalent transformation (LET), so no weight-activation quantization (``a_bits=16``).
- As in the harness's other methods, the range always contains 0 (``min' ≤ 0 ≤ max'``), so the integer zero point
  lies in the code range (the paper clamps the zero point to ±1e4 instead).
- Training in float32 (the paper uses mixed precision on GPU); scales are stored in fp16 afterwards, so the final
  quantized weight uses the fp16-rounded scale.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ptqbench.errors import ConfigError
from ptqbench.pipeline import LayerContext
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import QuantizedWeight, group_index, qmax, quantize_weight
from ptqbench.stages import RangeStage, register_stage

log = logging.getLogger(__name__)


@dataclass
class LWCConfig(MethodConfig):
    epochs: int = 2  # paper: 20 (CPU default, see the module docstring)
    lr: float = 1e-1  # AdamW learning rate of the clipping factors (paper's lwc_lr: 1e-2; CPU default, see above)
    wd: float = 0.0  # AdamW weight decay (paper: 0)
    batch_size: int = 1  # calibration windows per optimizer step (paper: 1)
    init: float = 4.0  # initial γ, β logits: σ(4) ≈ 0.982, almost no clipping (paper: 4.0)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"lwc.epochs={self.epochs}: use a positive number of epochs (paper: 20)")
        if not self.lr > 0:
            raise ConfigError(f"lwc.lr={self.lr}: use a positive learning rate (paper: 1e-2)")
        if self.wd < 0:
            raise ConfigError(f"lwc.wd={self.wd}: use a non-negative weight decay (paper: 0)")
        if self.batch_size < 1:
            raise ConfigError(f"lwc.batch_size={self.batch_size}: use a positive batch size (paper: 1)")
        super().__post_init__()


# ------------------------------------------------------------------------------------------------ LWC core
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``w`` (out, in) as (out, n_groups, gs), zero-padded on the right (0 never widens a range that contains 0)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    n_groups = math.ceil(in_f / gs)
    pad = n_groups * gs - in_f
    return F.pad(w, (0, pad)).reshape(out_f, n_groups, gs), in_f


def lwc_params(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, group_size: int, sym: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``scale`` and (STE-rounded) ``zero`` (out, n_groups) of ``w`` (out, in) with clipping logits
    ``gamma``/``beta`` (out, n_groups); differentiable in ``gamma`` and ``beta``."""
    wg, _ = _grouped(w, group_size)  # (out, n_groups, gs)
    maxq = qmax(bits)
    if sym:
        amax = wg.abs().amax(-1) * torch.sigmoid(gamma)
        scale = (2 * amax / maxq).clamp_min(1e-8)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        wmax = wg.amax(-1).clamp(min=0) * torch.sigmoid(gamma)
        wmin = wg.amin(-1).clamp(max=0) * torch.sigmoid(beta)
        scale = ((wmax - wmin) / maxq).clamp_min(1e-8)
        zero = _round_ste(-wmin / scale).clamp(0, maxq)
    return scale, zero


def lwc_fake_quant(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, group_size: int,
                   sym: bool) -> torch.Tensor:
    """The fake-quantized weight (out, in) under learnable clipping, differentiable in ``gamma`` and ``beta``."""
    scale, zero = lwc_params(w, gamma, beta, bits, group_size, sym)  # (out, n_groups)
    wg, in_f = _grouped(w, group_size)
    s, z = scale[..., None], zero[..., None]
    q = torch.clamp(_round_ste(wg / s) + z, 0, qmax(bits))
    return ((q - z) * s).reshape(w.shape[0], -1)[:, :in_f]


def init_lwc(w: torch.Tensor, group_size: int, init: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(gamma, beta)`` logits (out, n_groups) as trainable leaves."""
    n_groups = math.ceil(w.shape[1] / (w.shape[1] if group_size == -1 else group_size))
    make = lambda: torch.full((w.shape[0], n_groups), float(init), device=w.device, requires_grad=True)  # noqa: E731
    return make(), make()


@torch.no_grad()
def lwc_quantized_weight(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, group_size: int,
                         sym: bool) -> QuantizedWeight:
    """The shared integer format from the learned clipping (scales rounded to fp16 first, codes from those)."""
    scale, zero = lwc_params(w.float(), gamma, beta, bits, group_size, sym)
    scale = scale.to(torch.float16).float().clamp_min(6e-8)  # what is stored is what is used
    g_idx = group_index(w.shape[1], group_size, w.device)
    q = quantize_weight(w, scale, zero, bits, g_idx)
    return QuantizedWeight(q.cpu(), scale.to(torch.float16).cpu(), zero.to(torch.uint8).cpu(), bits, group_size,
                           g_idx.to(torch.int32).cpu(), sym)


def train_lwc(forward: Callable[[dict[str, torch.Tensor], Any], torch.Tensor], weights: dict[str, torch.Tensor],
              batches: list[tuple[Any, torch.Tensor]], bits: int, group_size: int, sym: bool, epochs: int,
              lr: float = 1e-2, wd: float = 0.0, init: float = 4.0
              ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """Learn clipping logits for ``weights`` ({name: (out, in)}) minimizing the MSE of ``forward`` on ``batches``.

    ``forward(qweights, inputs)`` runs the block with the given fake-quantized weights; ``batches`` holds
    ``(inputs, target)`` pairs, the target being the full-precision output. Returns ``{name: (gamma, beta)}`` and
    the mean loss of each epoch.
    """
    params = {n: init_lwc(w, group_size, init) for n, w in weights.items()}
    opt = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=lr, weight_decay=wd)
    history = []
    with torch.enable_grad():
        for _ in range(epochs):
            total = 0.0
            for inputs, target in batches:
                qw = {n: lwc_fake_quant(w, *params[n], bits, group_size, sym) for n, w in weights.items()}
                loss = F.mse_loss(forward(qw, inputs), target)
                if not torch.isfinite(loss):
                    raise FloatingPointError("lwc: the loss is not finite; lower method.params.range.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            history.append(total / max(len(batches), 1))
    return {n: (g.detach(), b.detach()) for n, (g, b) in params.items()}, history


# ------------------------------------------------------------------------------------------------ the method
def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _slice(v: Any, i: int, j: int, batch: int) -> Any:
    """Rows ``i:j`` of a keyword input whose first dimension is the chunk's batch (masks); others as they are."""
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch and batch > 1:
        return v[i:j]
    if isinstance(v, tuple):
        return tuple(_slice(x, i, j, batch) for x in v)
    return v


@register_stage
class LWC(RangeStage):
    """OmniQuant's learnable weight clipping (Shao et al., 2024), trained block by block on the output MSE."""

    name = "lwc"
    synonyms = ("omniquant",)
    family = "optimization"
    config_cls = LWCConfig
    requires_calibration = True
    layerwise = True
    roundings = ("nearest",)
    supported_a_bits = (16,)
    paper = "https://arxiv.org/abs/2308.13137"
    config: LWCConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fp_inputs: list[torch.Tensor] | None = None  # full-precision path: layer i's input, per chunk
        self._losses: list[tuple[float, float]] = []  # (first, last) epoch loss per layer
        self._params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # this layer's (gamma, beta) per linear

    def info(self) -> dict[str, float]:
        first = [a for a, _ in self._losses]
        last = [b for _, b in self._losses]
        return {"epochs": float(self.config.epochs),
                "lwc_loss_first_epoch_mean": sum(first) / max(len(first), 1),
                "lwc_loss_last_epoch_mean": sum(last) / max(len(last), 1)}

    def fit_layer(self, ctx: LayerContext, names: list[str]) -> None:
        layer, c, sch = ctx.layer, self.config, self.scheme
        fp_in = self._fp_inputs if self._fp_inputs is not None else ctx.inputs  # layer 0: both paths agree
        with torch.no_grad():  # the FP targets: the unquantized layer on the FP path's inputs
            fp_out = [_layer_output(layer(x, **kw)) for x, kw in zip(fp_in, ctx.kwargs)]
        self._fp_inputs = fp_out

        batches = []  # (quantized-path input, its kwargs), FP target
        for x, kw, y in zip(ctx.inputs, ctx.kwargs, fp_out):
            b = x.shape[0]
            for i in range(0, b, c.batch_size):
                j = min(i + c.batch_size, b)
                batches.append(((x[i:j], {k: _slice(v, i, j, b) for k, v in kw.items()}), y[i:j]))

        linears = ctx.linears
        targets = [n for n in names if n in linears]
        weights = {n: linears[n].weight.detach().float() for n in targets}
        grad_flags = {n: p.requires_grad for n, p in layer.named_parameters()}
        for p in layer.parameters():  # only γ, β learn; no gradients for the block's own parameters
            p.requires_grad_(False)

        def forward(qw: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
            x, kw = inputs
            overrides = {f"{n}.weight": w.to(linears[n].weight.dtype) for n, w in qw.items()}
            return _layer_output(functional_call(layer, overrides, (x,), kw))

        try:
            params, history = train_lwc(forward, weights, batches, sch.w_bits, sch.group_size, sch.sym, c.epochs,
                                        c.lr, c.wd, c.init)
        finally:
            for n, p in layer.named_parameters():
                p.requires_grad_(grad_flags[n])
        self._losses.append((history[0], history[-1]))
        self._params = params
        log.info("lwc %s: loss %.4g -> %.4g", ctx.name, history[0], history[-1])

    def nearest(self, name: str, w: torch.Tensor) -> QuantizedWeight:
        if name not in self._params:
            raise RuntimeError(f"lwc: no learned clipping for {name}: fit_layer runs first, inside the layer loop")
        sch = self.scheme
        return lwc_quantized_weight(w.float(), *self._params.pop(name), sch.w_bits, sch.group_size, sch.sym)
