"""``awq`` transform: AWQ's activation-aware per-channel scaling.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024, https://arxiv.org/abs/2306.00978.

A small fraction of input channels carry large activations; the weights that multiply them matter most. AWQ
scales each input channel of a group of linears by ``s = s_x^α`` (``s_x``: mean ``|x|`` of the channel over the
calibration tokens), so the quantized weight is ``Q(W·diag(s))`` and the input is divided by ``s`` — exactly, by
folding ``1/s`` into the operation that produces the input (``methods/transform/folding.py``). ``α`` is searched on
a grid of 20 points in ``[0, 1)`` to minimise the mean squared error of the output of the module that consumes the
group (attention for q/k/v, the MLP for gate/up, the linear itself for o and down) when its weights are quantized
with min-max RTN at the scheme's bits and group size. The paper's second half, the weight-clipping search, is the
``clip`` range stage (``methods/range/clip.py``); the alias ``awq`` is the recipe ``awq+clip+nearest``.

Groups and where their scales go (the reference code's Llama layout):
``q/k/v`` → the norm that feeds them (``input_layernorm``); ``o`` → the rows of ``v_proj`` when ``v_proj``'s output
and ``o_proj``'s input have the same size (multi-head attention; with grouped-query attention, as in SmolLM2, the
reference code skips scaling o_proj, and so do we); ``gate/up`` → their norm (``post_attention_layernorm``);
``down`` → the rows of ``up_proj``. The norm feeding a group is found by tracing which module produced its input,
so other layouts with a norm before the attention and the MLP work too (Gemma's ``1 + w`` norms included).

Paper defaults kept: ``s = s_x^α`` normalised by ``sqrt(max(s)·min(s))``, 20-point α grid, scales searched on the
layer as it arrives (every group's search starts from the unscaled layer, then all scales are applied). As the
reference code does, the same pass keeps 512 tokens strided over the calibration set per group, scaled into the
new basis, as the sample a following clip-search range stage scores its thresholds on (``ctx.state``).

Deviations (documented):
- Calibration layers see the outputs of the already-quantized layers before them (the shared GPTQ-style
  pipeline); the reference code feeds each layer the full-precision outputs of the previous one.
- ``search_tokens``: the α search runs on a subset of the calibration tokens (default 512 of the 16384 of the
  default 32 × 512 set: one whole window for attention, tokens strided over all windows for the MLP and down_proj);
  ``s_x`` always uses every token. The reference code searches on all tokens, which costs 20 module forwards per
  group and layer (about 4× the whole AWQ time at 512 on 2 CPU cores); ``search_tokens=0`` restores that. On the
  first 6 layers of SmolLM2 at W3 g64 (16 × 512 docs windows) the output error was 0.172 at 512 tokens, 0.169 at
  2048 and 0.168 with all tokens (RTN: 0.316).
- ``alpha``: a fixed α instead of the search (``null``, the default, searches as the paper does).
- The α search always scores min-max RTN, whatever range and rounding stages follow (as the paper's AWQ+GPTQ
  combination does): the scales are chosen for the grid, not for the compensation that comes after.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.methods.transform.folding import (fold_into_norm, fold_into_rows, input_producers, scale_columns,
                                                smoothing_groups, take_batch)
from ptqbench.pipeline import LayerContext
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import rtn_fake_quant
from ptqbench.stages import Transform, register_stage


@dataclass
class AWQScaleConfig(MethodConfig):
    n_grid: int = 20  # α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    alpha: float | None = None  # fixed α in [0, 1] instead of the grid search (ablations); None: search
    search_tokens: int = 512  # tokens for the α search; 0 = all (the reference code); see the module docstring
    clip_tokens: int = 512  # tokens strided over the calibration set kept for a clip-search range (reference: 512)

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise ConfigError(f"awq.n_grid={self.n_grid}: use a positive number of α grid points (paper: 20)")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"awq.alpha={self.alpha}: use a value in [0, 1], or null to search it (paper)")
        if self.clip_tokens < 1:
            raise ConfigError(f"awq.clip_tokens={self.clip_tokens}: use a positive number of tokens (paper: 512)")
        if self.search_tokens < 0:
            raise ConfigError(f"awq.search_tokens={self.search_tokens}: use 0 (all tokens) or a positive number")
        super().__post_init__()


# ------------------------------------------------------------------------------------------ pure tensor cores
def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scales ``s_x^α`` (in,), normalised so that ``max(s)·min(s) = 1``."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_alpha(x_mean: torch.Tensor, loss_of: Callable[[torch.Tensor], float], n_grid: int = 20
                 ) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of α in ``[0, 1)``: ``loss_of(s)`` is the output error with scales ``s``; returns the best
    scales, the best α and the loss per grid point."""
    losses: list[float] = []
    best = (math.inf, 0.0, awq_scales(x_mean, 0.0))
    for i in range(n_grid):
        alpha = i / n_grid
        s = awq_scales(x_mean, alpha)
        loss = float(loss_of(s))
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """``Q(W·diag(s))·diag(s)⁻¹``: the effective weight seen by the unscaled input (out, in)."""
    return rtn_fake_quant(w.float() * s[None, :], bits, group_size, sym) / s[None, :]


def linear_scale_loss(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, bits: int, group_size: int,
                      sym: bool) -> float:
    """Mean squared output error of one linear ``x Wᵀ`` (x: (n, in)) when quantized with AWQ scales ``s``."""
    ref = x.float() @ w.float().t()
    return float((x.float() @ scaled_fake_quant(w, s, bits, group_size, sym).t() - ref).pow(2).mean())


def _accepts_kwargs(mod: nn.Module) -> bool:
    params = inspect.signature(mod.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "position_embeddings" for p in params)


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


class _Inputs:
    """What one group's input contributes: ``Σ|x|`` per channel over all tokens, a strided token sample for the
    α search, another for the clipping search, and the first whole windows (for attention modules)."""

    def __init__(self, n_tokens: int, seq: int, search_tokens: int, clip_tokens: int, windows: int) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.seq, self.windows = seq, windows
        self.stride_s = max(1, n_tokens // search_tokens) if search_tokens else 1
        self.stride_c = max(1, n_tokens // clip_tokens)
        self.search: list[torch.Tensor] = []
        self.clip: list[torch.Tensor] = []
        self.win: list[torch.Tensor] = []
        self.n_win = 0

    def __call__(self, x: torch.Tensor) -> None:  # x: (tokens, in) of one chunk
        xf = x.float()
        s = xf.abs().sum(0, dtype=torch.float64)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        first = self.count
        self.count += x.shape[0]
        idx = torch.arange(first, self.count, device=x.device)
        self.search.append(xf[idx % self.stride_s == 0])
        self.clip.append(xf[idx % self.stride_c == 0])
        if self.n_win < self.windows:
            w = xf.reshape(-1, self.seq, x.shape[-1])[: self.windows - self.n_win]
            self.win.append(w)
            self.n_win += w.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


# ------------------------------------------------------------------------------------------ the stage
@register_stage
class AWQScale(Transform):
    """AWQ (Lin et al., 2024): activation-aware per-channel scales, searched per group and folded exactly."""

    name = "awq"
    family = "salience/scaling"
    config_cls = AWQScaleConfig
    level = "layer"
    requires_calibration = True
    supported_a_bits = (16,)  # weight-only: the α search ignores activation quantization
    paper = "https://arxiv.org/abs/2306.00978"
    config: AWQScaleConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._alphas: dict[str, list[float]] = {}
        self._err_gain: list[float] = []

    def info(self) -> dict[str, float]:
        out = {f"alpha_mean_{kind}": sum(v) / len(v) for kind, v in self._alphas.items()}
        if self._err_gain:  # mean over searched groups of (error at α=0) / (error at the chosen α)
            out["search_gain"] = sum(self._err_gain) / len(self._err_gain)
        return out

    @torch.no_grad()
    def apply_layer(self, ctx: LayerContext) -> None:
        c, sch = self.config, self.scheme
        bits, gs, sym = sch.w_bits, sch.group_size, sch.sym
        mods = dict(ctx.layer.named_modules())
        targets = set(ctx.targets)
        b0, seq = ctx.inputs[0].shape[:2]
        producers = input_producers(ctx.layer, ctx.inputs[0][:1], take_batch(ctx.kwargs[0], b0, 1))
        groups = smoothing_groups(ctx.layer, [g for g in ctx.groups() if any(n in targets for n in g)], producers)

        # 1. one pass over the layer as it arrives: activation statistics and input samples per group
        n_win = max(1, math.ceil(c.search_tokens / seq)) if c.search_tokens else sum(x.shape[0] for x in ctx.inputs)
        blocks = {g[0]: _search_block(ctx.layer, mods, g) for g, _, _ in groups}  # (module, takes whole windows)
        feats = {g[0]: _Inputs(ctx.n_tokens, seq, c.search_tokens, c.clip_tokens, n_win if blocks[g[0]][1] else 0)
                 for g, _, _ in groups}
        ctx.run_hooked(dict(feats))
        kw = take_batch(ctx.kwargs[0], b0, n_win)

        # 2. α search per group, every group from the unscaled layer (the reference code's order)
        plans = []
        for g, prev, kind in groups:
            f = feats[g[0]]
            x_mean = f.mean
            if kind == "none":
                plans.append((g, prev, kind, None))
                continue
            block, windows = blocks[g[0]]
            if windows:  # attention: whole windows, with masks and rotary inputs
                x_s = torch.cat(f.win)
                run = lambda b=block, x=x_s: _out(b(x, **kw))  # noqa: E731
            else:
                x_s = torch.cat(f.search)
                run = lambda b=block, x=x_s: _out(b(x))  # noqa: E731
            lins = [mods[n] for n in g]
            orig = [m.weight.data for m in lins]
            w_cat = torch.cat(orig)  # (Σ out, in): the group's rows share their groups' columns, one fake-quant
            ref = run()

            def loss_of(s: torch.Tensor) -> float:
                wq = scaled_fake_quant(w_cat, s, bits, gs, sym)
                for m, part, w in zip(lins, wq.split([w.shape[0] for w in orig]), orig):
                    m.weight.data = part.to(w.dtype)
                return float((run() - ref).float().pow(2).mean())

            try:
                if c.alpha is not None:
                    s, alpha = awq_scales(x_mean, c.alpha), c.alpha
                else:
                    s, alpha, losses = search_alpha(x_mean, loss_of, c.n_grid)
                    self._err_gain.append(losses[0] / max(min(losses), 1e-30))
            finally:
                for m, w in zip(lins, orig):
                    m.weight.data = w
            key = g[0].split(".")[-1]
            self._alphas.setdefault(key, []).append(alpha)
            plans.append((g, prev, kind, s))

        # 3. apply every group's scales (exact in floating point)
        for g, prev, kind, s in plans:
            if s is None:
                continue
            if kind == "norm":
                fold_into_norm(mods[prev], s)
            else:
                fold_into_rows(mods[prev], s)
            scale_columns([mods[n] for n in g], s)

        # 4. leave each group's clip-search sample, in the scaled basis, for a range stage that wants it
        samples = ctx.state.setdefault("range_samples", {})
        for g, _, _, s in plans:
            x_c = torch.cat(feats[g[0]].clip)
            x_c = x_c if s is None else x_c / s[None, :]  # one tensor per group: the group's linears share it
            for name in g:
                samples[name] = x_c


def _search_block(layer: nn.Module, mods: dict[str, nn.Module], group: list[str]) -> tuple[nn.Module, bool]:
    """The module whose output error scores a group's scales (the linears' common parent, e.g. the attention or
    the MLP; a lone linear scores itself), and whether it needs whole windows and the layer's keyword inputs."""
    if len(group) == 1:
        return mods[group[0]], False
    parent = _common_parent(group)
    if not parent:  # linears directly under the layer: score their concatenated outputs
        return _Concat([mods[n] for n in group]), False
    return mods[parent], _accepts_kwargs(mods[parent])


class _Concat(nn.Module):
    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.linears = linears  # a plain list: not registered, the layer owns them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(x) for lin in self.linears], dim=-1)


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, (tuple, list)) else o
