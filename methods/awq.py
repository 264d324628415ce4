"""``awq``: AWQ — Activation-aware Weight Quantization for LLM Compression and Acceleration.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, MLSys 2024, https://arxiv.org/abs/2306.00978.

A small fraction of input channels carry large activations; the weights that multiply them matter most. AWQ
scales each input channel of a group of linears by ``s = s_x^α`` (``s_x``: mean ``|x|`` of the channel over the
calibration tokens), quantizes ``W·diag(s)`` and divides the input by ``s`` — exactly, by folding ``1/s`` into the
operation that produces the input (the preceding norm, or the rows of the preceding linear). ``α`` is searched on
a grid of 20 points in ``[0, 1)`` to minimise the mean squared error of the output of the module that consumes the
group (attention for q/k/v, the MLP for gate/up, the linear itself for o and down). Then the reference code's
clipping search shrinks each group's weight range (max ``|w|`` × ``1 - i/20``, ``i < 10``) to minimise the
linear's output error per group, and the weights are quantized with RTN at the scheme's bits and group size.

Groups and where their scales go (the reference code's Llama layout):
``q/k/v`` → the norm that feeds them (``input_layernorm``); ``o`` → the rows of ``v_proj`` when ``v_proj``'s output
and ``o_proj``'s input have the same size (multi-head attention; with grouped-query attention, as in SmolLM2, the
reference code skips scaling o_proj, and so do we); ``gate/up`` → their norm (``post_attention_layernorm``);
``down`` → the rows of ``up_proj``. The norm feeding a group is found by tracing which module produced its input,
so other layouts with a norm before the attention and the MLP work too (Gemma's ``1 + w`` norms included).
Like the reference code, ``q_proj``/``k_proj`` skip the clipping search (their error passes through ``q·kᵀ``).

Paper defaults kept: ``s = s_x^α`` normalised by ``sqrt(max(s)·min(s))``, 20-point α grid, clip grid of 20 with
max shrink 0.5 on 512 tokens strided over the calibration set, scales searched on the layer as it arrives (every
group's search starts from the unscaled layer, then all scales are applied, then clipping is searched on the
scaled inputs).

Deviations (documented):
- Calibration layers see the outputs of the already-quantized layers before them (the shared GPTQ-style
  pipeline); the reference code feeds each layer the full-precision outputs of the previous one.
- ``search_tokens``: the α search runs on a subset of the calibration tokens (default 512 of the 16384 of the
  default 32 × 512 set: one whole window for attention, tokens strided over all windows for the MLP and down_proj);
  ``s_x`` always uses every token. The reference code searches on all tokens, which costs 20 module forwards per
  group and layer (about 4× the whole AWQ time at 512 on 2 CPU cores); ``search_tokens=0`` restores that. On the
  first 6 layers of SmolLM2 at W3 g64 (16 × 512 docs windows) the output error was 0.172 at 512 tokens, 0.169 at
  2048 and 0.168 with all tokens (RTN: 0.316).
- The clipping error per group is computed from the Gram matrix of the 512 strided tokens (same objective as the
  reference's token-by-token sum, fewer operations).
- ``alpha``: a fixed α instead of the search (``null``, the default, searches as the paper does).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.pipeline import LayerContext, LayerwiseQuantizer
from ptqbench.quantizer import MethodConfig, QuantResult, register, set_linear_weight
from ptqbench.scheme import QuantizedWeight, compute_qparams, fake_quantize, rtn_quantize


@dataclass
class AWQConfig(MethodConfig):
    n_grid: int = 20  # α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    alpha: float | None = None  # fixed α in [0, 1] instead of the grid search (ablations); None: search
    clip: bool = True  # weight-clipping search after scaling (reference code: auto_clip)
    clip_grid: int = 20  # clip thresholds max|w| · (1 - i/clip_grid)
    max_shrink: float = 0.5  # ... for i < max_shrink · clip_grid
    clip_tokens: int = 512  # tokens strided over the calibration set for the clipping search (reference: 512)
    search_tokens: int = 512  # tokens for the α search; 0 = all (the reference code); see the module docstring

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise ConfigError(f"awq.n_grid={self.n_grid}: use a positive number of α grid points (paper: 20)")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"awq.alpha={self.alpha}: use a value in [0, 1], or null to search it (paper)")
        if self.clip_grid < 1:
            raise ConfigError(f"awq.clip_grid={self.clip_grid}: use a positive grid size (paper: 20)")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"awq.max_shrink={self.max_shrink}: use a value in [0, 1) (paper: 0.5)")
        if self.clip_tokens < 1:
            raise ConfigError(f"awq.clip_tokens={self.clip_tokens}: use a positive number of tokens (paper: 512)")
        if self.search_tokens < 0:
            raise ConfigError(f"awq.search_tokens={self.search_tokens}: use 0 (all tokens) or a positive number")
        super().__post_init__()


# ------------------------------------------------------------------------------------------ pure tensor cores
def fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """RTN quantize-dequantize ``w`` (out, in) with min-max groups along the input (``compute_qparams`` +
    ``fake_quantize`` of ptqbench.scheme, in one pass of in-place ops: it runs 20 times per group and layer)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:  # partial last group: the shared (slower) path
        return rtn_quantize(w, bits, group_size, sym).dequantize().to(w.device)
    g = w.float().reshape(-1, gs)  # (out · n_groups, gs)
    maxq = 2**bits - 1
    if sym:
        scale = (2 * g.abs().amax(dim=1, keepdim=True) / maxq).clamp_min_(1e-8)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        lo = g.amin(dim=1, keepdim=True).clamp_(max=0)  # (two reductions are faster than aminmax on CPU)
        hi = g.amax(dim=1, keepdim=True).clamp_(min=0)
        scale = ((hi - lo) / maxq).clamp_min_(1e-8)
        zero = torch.round(-lo / scale).clamp_(0, maxq)
    q = torch.div(g, scale).round_().add_(zero).clamp_(0, maxq)
    return q.sub_(zero).mul_(scale).reshape(out_f, in_f)


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
    return fake_quant(w.float() * s[None, :], bits, group_size, sym) / s[None, :]


def linear_scale_loss(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, bits: int, group_size: int,
                      sym: bool) -> float:
    """Mean squared output error of one linear ``x Wᵀ`` (x: (n, in)) when quantized with AWQ scales ``s``."""
    ref = x.float() @ w.float().t()
    return float((x.float() @ scaled_fake_quant(w, s, bits, group_size, sym).t() - ref).pow(2).mean())


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group Gram matrices ``Σ x_gᵀ x_g`` (G, gs, gs) of inputs ``x`` (n, in): the block diagonal of ``XᵀX``."""
    n, in_f = x.shape
    gs = in_f if group_size == -1 else group_size
    xg = x.float().reshape(n, in_f // gs, gs).transpose(0, 1)  # (G, n, gs)
    return torch.bmm(xg.transpose(1, 2), xg)


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
        raise ConfigError(f"awq clipping needs group_size dividing in_features={in_f}: set quant.partial_group=false")
    ng = in_f // gs
    wg = w.float().reshape(out_f, ng, gs)  # (out, G, gs)
    org_max = wg.abs().amax(dim=-1, keepdim=True)  # (out, G, 1)
    best_err = torch.full((out_f, ng), math.inf, device=w.device)
    best_max = org_max.squeeze(-1).clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        max_val = org_max * (1 - i / n_grid)
        cur = torch.clamp(wg, -max_val, max_val)
        q = fake_quant(cur.reshape(out_f, in_f), bits, group_size, sym).reshape(out_f, ng, gs)
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


# ------------------------------------------------------------------------------------------ folding helpers
def input_producers(layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, str | None]:
    """For each linear of ``layer``: the name of the leaf module whose output it takes as input (a norm), if any.

    Traced on one forward: outputs are kept alive during the probe so tensor identities are not reused.
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    found: dict[str, str | None] = {}
    handles = []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(
                (lambda n: lambda _m, a: found.__setitem__(n, produced.get(id(a[0]), (None,))[0]))(name)))
        elif name and not list(mod.children()):
            handles.append(mod.register_forward_hook(
                (lambda n: lambda _m, _a, o: produced.__setitem__(id(o), (n, o)) if isinstance(o, torch.Tensor)
                 else None)(name)))
    try:
        with torch.no_grad():
            layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """Make ``norm`` output ``norm(x) / s``: ``w/s`` (and ``b/s``), or ``(1+w)/s - 1`` for Gemma-style norms.

    The parametrization is checked on a probe rather than guessed from the class name.
    """
    w = norm.weight
    s = s.to(w.device, torch.float32)
    probe = torch.randn(4, w.numel(), dtype=w.dtype, device=w.device)
    ref = norm(probe).float() / s
    orig = w.data.clone()
    bias = getattr(norm, "bias", None)
    w.data = (orig.float() / s).to(w.dtype)
    if bias is not None:
        bias.data = (bias.data.float() / s).to(bias.dtype)
    if torch.allclose(norm(probe).float(), ref, rtol=1e-4, atol=1e-5):
        return
    w.data = ((1 + orig.float()) / s - 1).to(w.dtype)  # Gemma: y = norm(x) · (1 + w)
    if bias is not None or not torch.allclose(norm(probe).float(), ref, rtol=1e-4, atol=1e-5):
        raise ConfigError(f"cannot fold scales into {type(norm).__name__}: awq/smoothquant support norms computing "
                          "x̂·w(+b) or x̂·(1+w)")


@torch.no_grad()
def fold_into_rows(prev: nn.Linear, s: torch.Tensor) -> None:
    """Divide the output rows of ``prev`` (and its bias) by ``s``, so its consumer sees ``x / s``."""
    prev.weight.div_(s.to(prev.weight)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias))


@torch.no_grad()
def scale_columns(linears: list[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])


def smoothing_groups(layer: nn.Module, groups: list[list[str]], producers: dict[str, str | None]
                     ) -> list[tuple[list[str], str | None, str]]:
    """``(group, previous op, kind)`` per shared-input group; kind: ``norm``, ``linear`` or ``none``.

    A group fed by a norm folds into it; ``o_proj`` folds into ``v_proj`` when their sizes match, ``down_proj`` into
    ``up_proj`` (their inputs are no module's output, so they are matched by the Llama names).
    """
    mods = dict(layer.named_modules())
    out = []
    for g in groups:
        prod = producers.get(g[0])
        if prod is not None and isinstance(getattr(mods[prod], "weight", None), nn.Parameter) \
                and mods[prod].weight.numel() == mods[g[0]].in_features:
            out.append((g, prod, "norm"))
            continue
        prev = None
        for consumer, source in (("o_proj", "v_proj"), ("down_proj", "up_proj")):
            if len(g) == 1 and g[0].endswith(consumer):
                cand = g[0][: -len(consumer)] + source
                if cand in mods and mods[cand].out_features == mods[g[0]].in_features:
                    prev = cand
        out.append((g, prev, "linear" if prev else "none"))
    return out


def _take_batch(kwargs: dict[str, Any], batch: int, k: int) -> dict[str, Any]:
    """Keyword inputs for the first ``k`` samples of a chunk of ``batch`` (tensors with a batch dim are cut)."""
    return {key: (v[:k] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch and batch > 1
                  else v) for key, v in kwargs.items()}


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


# ------------------------------------------------------------------------------------------ the method
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


@register
class AWQ(LayerwiseQuantizer):
    """AWQ (Lin et al., 2024): activation-aware per-channel scaling and clipping, then RTN, layer by layer."""

    name = "awq"
    family = "salience/scaling"
    config_cls = AWQConfig
    requires_calibration = True
    supported_w_bits = (2, 3, 4, 5, 6, 7, 8)
    supported_a_bits = (16,)
    paper = "https://arxiv.org/abs/2306.00978"
    config: AWQConfig

    def quantize(self, model: nn.Module, calibration: Any) -> QuantResult:
        self._alphas: dict[str, list[float]] = {}
        self._err_gain: list[float] = []
        result = super().quantize(model, calibration)
        for kind, values in self._alphas.items():
            result.info[f"alpha_mean_{kind}"] = sum(values) / len(values)
        if self._err_gain:  # mean over searched groups of (error at α=0) / (error at the chosen α)
            result.info["search_gain"] = sum(self._err_gain) / len(self._err_gain)
        return result

    @torch.no_grad()
    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        c, sch = self.config, self.scheme
        bits, gs, sym = sch.w_bits, sch.group_size, sch.sym
        mods = dict(ctx.layer.named_modules())
        targets = set(ctx.targets)
        b0, seq = ctx.inputs[0].shape[:2]
        producers = input_producers(ctx.layer, ctx.inputs[0][:1], _take_batch(ctx.kwargs[0], b0, 1))
        groups = smoothing_groups(ctx.layer, [g for g in ctx.groups() if any(n in targets for n in g)], producers)

        # 1. one pass over the layer as it arrives: activation statistics and input samples per group
        n_win = max(1, math.ceil(c.search_tokens / seq)) if c.search_tokens else sum(x.shape[0] for x in ctx.inputs)
        blocks = {g[0]: _search_block(ctx.layer, mods, g) for g, _, _ in groups}  # (module, takes whole windows)
        feats = {g[0]: _Inputs(ctx.n_tokens, seq, c.search_tokens, c.clip_tokens, n_win if blocks[g[0]][1] else 0)
                 for g, _, _ in groups}
        ctx.run_hooked(dict(feats))
        kw = _take_batch(ctx.kwargs[0], b0, n_win)

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

        # 4. clipping search on the scaled inputs, then RTN
        out: dict[str, QuantizedWeight] = {}
        for g, _, _, s in plans:
            x_c = torch.cat(feats[g[0]].clip)
            gram = group_gram(x_c if s is None else x_c / s[None, :], gs) / x_c.shape[0]  # (G, gs, gs)
            for name in g:
                if name not in targets:
                    continue
                lin = mods[name]
                w = lin.weight.data.float()
                if c.clip and not name.split(".")[-1] in ("q_proj", "k_proj"):
                    w = apply_clip(w, search_clip(w, gram, bits, gs, sym, c.clip_grid, c.max_shrink), gs)
                qw = rtn_quantize(w, bits, gs, sym)
                set_linear_weight(lin, qw)
                out[name] = qw
        return out


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

