"""``smoothquant`` transform: SmoothQuant — Accurate and Efficient Post-Training Quantization for Large Language
Models.

Xiao, Lin, Seznec, Wu, Demouth, Han, ICML 2023, https://arxiv.org/abs/2211.10438.

Activations of LLMs have a few input channels with very large magnitudes, which a per-tensor activation scale
cannot represent; weights are easy to quantize. SmoothQuant migrates the difficulty from activations to weights
with a per-input-channel factor ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (``max|W_j|`` over every linear reading
the same input): ``X·diag(s)⁻¹`` is folded into the norm that produces ``X`` and ``diag(s)·W`` into the weights, so the
full-precision model is unchanged. The alias ``smoothquant`` is the recipe ``smoothquant+minmax+nearest``: the
weights are then quantized with RTN (W8 per channel in ``quant=w8a8``) and the run loop inserts the scheme's
activation quantizers (static per-tensor scales from the calibration set); ``smoothquant+gptq`` rounds the smoothed
weights with GPTQ instead. A model-level transform: the smoothing runs once, before any layer is quantized.

Paper defaults kept: α = 0.5; activation maxima from the full-precision model over the whole calibration set (one
pass, before any smoothing); smoothing applied where the paper's code applies it — the inputs of q/k/v (folded into
``input_layernorm``) and of the MLP's first linears (gate/up, folded into ``post_attention_layernorm``).

o_proj and down_proj are not smoothed by default, as in the paper (their inputs have no norm in front); they are
still quantized (weights RTN, activations by the run loop). ``smooth_fc_fc=true`` also smooths them by folding into
the rows of the linear before (``down_proj`` into ``up_proj``; ``o_proj`` into ``v_proj`` when their sizes match,
i.e. not with grouped-query attention) — an extension, off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError
from ptqbench.methods.transform.folding import (fold_into_norm, fold_into_rows, input_producers, scale_columns,
                                                smoothing_groups)
from ptqbench.models import decoder_layers, layers_prefix, linear_layers
from ptqbench.pipeline import LayerContext, capture_layer_inputs
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import FORMATS
from ptqbench.stages import Transform, register_stage


@dataclass
class SmoothQuantConfig(MethodConfig):
    alpha: float = 0.5  # migration strength: 0 leaves activations as they are, 1 moves all their range to weights
    smooth_fc_fc: bool = False  # also smooth down_proj (into up_proj) and o_proj (into v_proj, MHA only)
    batch_size: int = 1  # calibration windows per forward pass (memory only; 8 raised the peak by >1 GiB)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant.alpha={self.alpha}: use a migration strength in [0, 1] (paper: 0.5)")
        if self.batch_size < 1:
            raise ConfigError(f"smoothquant.batch_size={self.batch_size}: use a positive number of windows")
        super().__post_init__()


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` (in,) from the per-channel activation maxima (in,) and the weights
    (out_i, in) of every linear reading that input."""
    w_max = torch.cat([w.abs().float() for w in weights], dim=0).amax(dim=0).clamp(min=1e-5)  # (in,)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def activation_maxima(model: nn.Module, names: list[str], input_ids: torch.Tensor, batch_size: int
                      ) -> dict[str, torch.Tensor]:
    """Per-channel ``max|x|`` (in,) of each named linear's input over the calibration windows (decoder only)."""
    mods = linear_layers(model)
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def f(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            amax[name] = x if name not in amax else torch.maximum(amax[name], x)
        return f

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    base = getattr(model, "base_model", model)
    base = getattr(base, "model", base)  # the decoder without the lm_head: no (tokens × vocab) logits
    device = next(model.parameters()).device
    try:
        for chunk in tqdm(input_ids.split(batch_size), desc="smoothquant stats", leave=False):
            base(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


@register_stage
class SmoothQuant(Transform):
    """SmoothQuant (Xiao et al., 2023): per-channel smoothing folded into the norms (model-level, before the loop)."""

    name = "smoothquant"
    supported_formats = FORMATS  # an equivalence in floating point: any grid after it
    family = "salience/scaling"
    config_cls = SmoothQuantConfig
    level = "model"
    requires_calibration = True
    paper = "https://arxiv.org/abs/2211.10438"
    config: SmoothQuantConfig

    @torch.no_grad()
    def apply_model(self, model: nn.Module, calibration: Any) -> None:
        c = self.config
        was_training = model.training
        model.eval()
        layers, prefix = decoder_layers(model), layers_prefix(model)
        plans = []  # (layer index, layer, group, prev name, kind)
        probe_ids = calibration.input_ids[:1, : min(16, calibration.input_ids.shape[1])]
        # one short window traces which module feeds which linear (values do not matter: layer 0's input serves all)
        hidden, kwargs = capture_layer_inputs(model, probe_ids, 1)
        for i, layer in enumerate(layers):
            ctx = LayerContext(i, f"{prefix}.{i}", layer, hidden, kwargs[i], [])
            producers = input_producers(layer, hidden[0], kwargs[i][0])
            for g, prev, kind in smoothing_groups(layer, ctx.groups(), producers):
                if kind == "norm" or (kind == "linear" and c.smooth_fc_fc):
                    plans.append((i, layer, g, prev, kind))

        reps = [f"{prefix}.{i}.{g[0]}" for i, _, g, _, _ in plans]
        amax = activation_maxima(model, reps, calibration.input_ids, c.batch_size)
        ratios = []
        for (i, layer, g, prev, kind), rep in zip(plans, reps):
            mods = dict(layer.named_modules())
            lins = [mods[n] for n in g]
            s = smooth_scales(amax[rep], [m.weight for m in lins], c.alpha)
            (fold_into_norm if kind == "norm" else fold_into_rows)(mods[prev], s)
            scale_columns(lins, s)
            smoothed = amax[rep] / s  # the channel maxima after smoothing
            ratios.append(float(amax[rep].max() / amax[rep].median().clamp_min(1e-8))
                          / float(smoothed.max() / smoothed.median().clamp_min(1e-8)))
        self._info = {"smoothed_groups": float(len(plans))}
        if ratios:  # how much flatter the activation channel maxima became (max/median, before ÷ after)
            self._info["act_flattening"] = sum(ratios) / len(ratios)
        model.train(was_training)
