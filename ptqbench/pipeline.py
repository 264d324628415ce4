"""The shared sequential calibration pipeline (GPTQ's protocol), used by every calibration-based method.

1. The calibration windows run through the embeddings once; each decoder layer's keyword inputs (masks, rotary
   embeddings) are recorded by pass-through stand-ins, so no layer computes anything in this step.
2. For each decoder layer: the method sees a ``LayerContext`` holding the layer's inputs. It can ask for per-linear
   statistics gathered by hooks (``hessian``, ``collect_inputs``), run the layer or a sub-module, and quantize
   the layer's linears.
3. The quantized layer's outputs become the next layer's inputs, so each layer is calibrated on what it will
   really see after the layers before it were quantized.
4. Asymmetric calibration (GPTAQ and its descendants, ``fp_inputs=True``): a second stream carries the
   full-precision model's inputs of each layer. The rounding takes a floating-point snapshot of the layer
   (``snapshot_fp``) before it changes any weight; one forward of the snapshot per chunk records the FP inputs of
   the layer's linears (one per shared-input group) and gives the FP stream's next hidden states, then
   ``asym_hessians`` pairs them with the quantized layer's inputs group by group, as GPTQ's Hessians are gathered.
   Memory beyond GPTQ: one more copy of the hidden states (tokens × hidden floats), one layer's weights, and the
   layer's FP linear inputs while it is quantized (tokens × Σ distinct input widths floats; SmolLM2-135M at
   32 × 512 tokens: 37.7 MB and 214 MB), as the reference code's FP-input cache holds them.

Statistics are gathered with an early stop: the forward pass is cut right after the hooked linear has seen its
input, so asking for the q/k/v Hessian costs one norm, not a whole layer.
"""

from __future__ import annotations

import copy
import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ptqbench.models import decoder_layers, layers_prefix, linear_layers
from ptqbench.quantizer import QuantResult, Quantizer, set_linear_weight
from ptqbench.scheme import QuantizedWeight, QuantScheme, rtn_quantize

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a statistics hook once it has what it needs; ends that forward pass early."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its inputs and passes the hidden states through unchanged."""

    def __init__(self, inner: nn.Module, store: list, keep_hidden: bool) -> None:
        super().__init__()
        self.inner = inner
        self.store = store
        self.keep_hidden = keep_hidden

    def __getattr__(self, name: str) -> Any:  # models read attributes such as attention_type off their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise RuntimeError("ptqbench expects decoder layers to take their extra inputs as keywords")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        self.store.append((hidden_states if self.keep_hidden else None, kwargs))
        return hidden_states


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int
                         ) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Layer 0's hidden states per chunk, and every layer's keyword inputs per chunk."""
    layers = decoder_layers(model)
    stores: list[list] = [[] for _ in layers]
    originals = list(layers)
    device = next(model.parameters()).device
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, stores[i], keep_hidden=(i == 0))
        base = getattr(model, "base_model", model)
        for chunk in input_ids.split(batch_size):
            base(input_ids=chunk.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden = [h for h, _ in stores[0]]
    kwargs = [[kw for _, kw in store] for store in stores]
    return hidden, kwargs


_GROUP_CACHE: dict[tuple, list[list[str]]] = {}


@dataclass
class LayerContext:
    """One decoder layer during calibration, with its inputs and the names of the linears to quantize."""

    index: int
    name: str  # full module name, e.g. model.layers.3
    layer: nn.Module
    inputs: list[torch.Tensor]  # per chunk (batch, seq, hidden)
    kwargs: list[dict[str, Any]]  # per chunk: the layer's keyword inputs
    targets: list[str]  # linear names relative to the layer that the method must quantize
    state: dict[str, Any] = field(default_factory=dict)  # free space for methods across calls
    fp_inputs: list[torch.Tensor] | None = None  # per chunk: the full-precision model's inputs of this layer
    fp_layer: nn.Module | None = None  # the layer in floating point, taken by ``snapshot_fp``
    fp_outputs: list[torch.Tensor] | None = None  # per chunk: the snapshot's outputs (the FP stream's next inputs)
    _fp_linear_inputs: dict[str, list[torch.Tensor]] | None = None  # group representative -> per chunk (tokens, in)

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return {n: m for n, m in self.layer.named_modules() if isinstance(m, nn.Linear)}

    @property
    def n_tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.inputs)

    @torch.no_grad()
    def forward(self, module: nn.Module | None = None) -> list[torch.Tensor]:
        """Run the whole layer (or ``module``, a replacement for it) on every chunk; returns the outputs."""
        mod = module or self.layer
        return [_layer_output(mod(x, **kw)) for x, kw in zip(self.inputs, self.kwargs)]

    @torch.no_grad()
    def run_hooked(self, hooks: dict[str, Callable[[torch.Tensor], None]], stop_early: bool = True) -> None:
        """Run the layer on every chunk calling ``hooks[name](x)`` with each linear's input ``x`` (tokens, in).

        With ``stop_early`` the pass ends as soon as every hooked linear has seen its input.
        """
        linears = self.linears
        for x, kw in zip(self.inputs, self.kwargs):
            _run_hooked_chunk(self.layer, linears, hooks, x, kw, stop_early)

    def groups(self) -> list[list[str]]:
        """Linear names grouped by shared input tensor, in execution order (q/k/v, o, gate/up, down for Llama)."""
        linears = self.linears
        key = (type(self.layer).__name__, tuple(linears))
        if key not in _GROUP_CACHE:
            # keep every input tensor alive until the grouping is done: comparing by ``id()`` alone is wrong, since
            # CPython reuses a freed tensor's id (o_proj's input is freed before gate/up's input is allocated, and
            # the two then shared an id in about 1 run in 16, handing gate/up o_proj's Hessian)
            # prepend: see each linear's input before any pre-hook already on it replaces it (an activation
            # quantizer returns a new tensor per linear, which would split q/k/v into three groups, and the cache
            # would hand that split to every later recipe in the process: AWQ then folds a scale into the norm
            # but compensates only q_proj)
            order: list[tuple[str, torch.Tensor]] = []
            handles = [m.register_forward_pre_hook(
                (lambda n: lambda _m, a: order.append((n, a[0])))(n), prepend=True) for n, m in linears.items()]
            try:
                with torch.no_grad():
                    self.layer(self.inputs[0][:1], **_slice_kwargs(self.kwargs[0], self.inputs[0].shape[0]))
            finally:
                for h in handles:
                    h.remove()
            groups: list[list[str]] = []
            prev: torch.Tensor | None = None
            for n, x in order:
                if prev is not None and x is prev:
                    groups[-1].append(n)
                else:
                    groups.append([n])
                    prev = x
            del order, prev
            _GROUP_CACHE[key] = groups
        return [list(g) for g in _GROUP_CACHE[key]]

    def hessians(self, names: list[str]) -> dict[str, torch.Tensor]:
        """GPTQ's ``H = 2/N · Σ xᵀx`` (in, in) per named linear; linears sharing an input share one matrix."""
        h, _ = self._input_moments(names, with_fp=False)
        return h

    def snapshot_fp(self) -> None:
        """Keep the layer as it is now (floating point, after any layer-level transform) for the FP stream."""
        if self.fp_inputs is None:
            raise RuntimeError("asymmetric calibration needs the full-precision stream: run_sequential(fp_inputs=True)")
        if self.fp_layer is None:
            self.fp_layer = copy.deepcopy(self.layer)

    @torch.no_grad()
    def _capture_fp(self) -> None:
        """One forward of the FP snapshot per chunk: every shared-input group's FP input, and the layer's output."""
        reps = [g[0] for g in self.groups()]
        fp_lin = {n: m for n, m in self.fp_layer.named_modules() if isinstance(m, nn.Linear)}  # type: ignore[union-attr]
        got: dict[str, list[torch.Tensor]] = {r: [] for r in reps}
        handles = [fp_lin[r].register_forward_pre_hook(
            (lambda r: lambda _m, a: got[r].append(a[0].reshape(-1, a[0].shape[-1])))(r)) for r in reps]
        try:
            self.fp_outputs = [_layer_output(self.fp_layer(x, **kw))  # type: ignore[misc]
                               for x, kw in zip(self.fp_inputs, self.kwargs)]  # type: ignore[arg-type]
        finally:
            for h in handles:
                h.remove()
        self._fp_linear_inputs = got

    @torch.no_grad()
    def asym_hessians(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """GPTAQ's statistics per named linear: ``H = 2/N·X_qᵀX_q`` and ``D = 2/N·(X_fp − X_q)ᵀX_q`` (in, in).

        ``X_q``: the linear's inputs in the layer as quantized so far, on the quantized stream; ``X_fp``: its inputs
        in the floating-point snapshot, on the full-precision stream (token for token the same positions).
        """
        if self.fp_layer is None or self.fp_inputs is None:
            raise RuntimeError("call snapshot_fp() before the layer's first weight changes")
        if self._fp_linear_inputs is None:
            self._capture_fp()
        h, d = self._input_moments(names, with_fp=True)
        return {n: (h[n], d[n]) for n in names}

    @torch.no_grad()
    def _input_moments(self, names: list[str], with_fp: bool
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One hooked pass over the chunks: ``2/N·X_qᵀX_q`` and, ``with_fp``, ``2/N·(X_fp − X_q)ᵀX_q`` per name.

        One hook per distinct input: the first linear of each shared-input group stands for the rest, and its matrices
        are shared by the group. N counts the tokens that reach the first hooked group (every group sees each token).
        """
        group_of = {n: g[0] for g in self.groups() for n in g}
        reps = list(dict.fromkeys(group_of.get(n, n) for n in names))
        h: dict[str, torch.Tensor] = {}
        d: dict[str, torch.Tensor] = {}
        n_tok = 0
        chunk = 0

        def acc(r: str) -> Callable[[torch.Tensor], None]:
            def f(xq: torch.Tensor) -> None:
                nonlocal n_tok
                xq = xq.float()  # (tokens, in)
                if r == reps[0]:
                    n_tok += xq.shape[0]
                if r not in h:
                    h[r] = torch.zeros(xq.shape[1], xq.shape[1], device=xq.device)
                h[r].addmm_(xq.t(), xq)
                if with_fp:  # the FP snapshot's input at the same token positions as this chunk's
                    dx = self._fp_linear_inputs[r][chunk].float() - xq  # type: ignore[index]  # (tokens, in)
                    if r not in d:
                        d[r] = torch.zeros_like(h[r])
                    d[r].addmm_(dx.t(), xq)
            return f

        hooks = {r: acc(r) for r in reps}
        linears = self.linears
        for chunk, (x, kw) in enumerate(zip(self.inputs, self.kwargs)):
            _run_hooked_chunk(self.layer, linears, hooks, x, kw)
        scale = 2.0 / max(n_tok, 1)
        for r in reps:
            h[r].mul_(scale)
            if with_fp:
                d[r].mul_(scale)
        return ({n: h[group_of.get(n, n)] for n in names},
                {n: d[group_of.get(n, n)] for n in names} if with_fp else {})

    def collect_inputs(self, names: list[str]) -> dict[str, list[torch.Tensor]]:
        """The raw inputs (tokens, in) each named linear sees, per chunk (for activation statistics)."""
        got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.run_hooked({n: (lambda n: lambda x: got[n].append(x.detach().clone()))(n) for n in names})
        return got


def _run_hooked_chunk(layer: nn.Module, linears: dict[str, nn.Linear], hooks: dict[str, Callable[[torch.Tensor], None]],
                      x: torch.Tensor, kwargs: dict[str, Any], stop_early: bool = True) -> None:
    """Run ``layer`` on one chunk, calling ``hooks[name]`` with each named linear's input (tokens, in); with
    ``stop_early`` the pass ends as soon as every hooked linear has seen its input."""
    seen: set[str] = set()

    def make(name: str):
        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            hooks[name](args[0].reshape(-1, args[0].shape[-1]))
            seen.add(name)
            if stop_early and len(seen) == len(hooks):
                raise _StopForward
        return pre_hook

    handles = [linears[n].register_forward_pre_hook(make(n)) for n in hooks]
    try:
        layer(x, **kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def _slice_kwargs(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Keyword inputs for the first sample of a chunk (masks carry the batch dimension)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch and batch > 1:
            out[k] = v[:1]
        else:
            out[k] = v
    return out


def target_linears(model: nn.Module, scheme: QuantScheme) -> tuple[list[str], list[str]]:
    """(names to quantize, names kept in floating point) over all linears of the model."""
    quant, keep = [], []
    for name, lin in linear_layers(model).items():
        (keep if any(k and k in name for k in scheme.keep_fp) else quant).append(name)
    return quant, keep


def check_model_scheme(model: nn.Module, scheme: QuantScheme) -> None:
    """Refuse a group size that does not fit a layer, before any work."""
    quant, _ = target_linears(model, scheme)
    mods = linear_layers(model)
    for name in quant:
        scheme.check_layer(name, mods[name].in_features)


def config_linears(config: dict[str, Any]) -> dict[str, int]:
    """``{linear name: in_features}`` of a decoder LM's layers from its ``config.json`` alone (Llama-style
    q/k/v/o/gate/up/down or OPT-style q/k/v/out/fc1/fc2), or {} for a config this does not recognise."""
    hidden, n_layers = config.get("hidden_size"), config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, n_layers, heads)):
        return {}
    attn = (config.get("head_dim") or hidden // heads) * heads  # o_proj's input: heads x head_dim (Gemma != hidden)
    if isinstance(config.get("intermediate_size"), int):
        prefix, mlp = "model.layers", {"mlp.gate_proj": hidden, "mlp.up_proj": hidden,
                                       "mlp.down_proj": config["intermediate_size"]}
        out = "self_attn.o_proj"
    elif isinstance(config.get("ffn_dim"), int):
        prefix, mlp = "model.decoder.layers", {"fc1": hidden, "fc2": config["ffn_dim"]}
        out = "self_attn.out_proj"
    else:
        return {}
    per_layer = {"self_attn.q_proj": hidden, "self_attn.k_proj": hidden, "self_attn.v_proj": hidden, out: attn, **mlp}
    return {f"{prefix}.{i}.{n}": d for i in range(n_layers) for n, d in per_layer.items()}


def check_config_scheme(config: dict[str, Any], scheme: QuantScheme) -> None:
    """``check_model_scheme`` from the model's config.json, before the model is loaded (a group size that does
    not divide the hidden size is known from the config). The names follow the usual layouts; the check on the
    loaded model stays the authority for layouts this does not know."""
    for name, in_features in config_linears(config).items():
        if not any(k and k in name for k in scheme.keep_fp):
            scheme.check_layer(name, in_features)


def run_sequential(model: nn.Module, input_ids: torch.Tensor, scheme: QuantScheme,
                   process: Callable[[LayerContext], None], batch_size: int = 8, desc: str = "layers",
                   fp_inputs: bool = False) -> None:
    """Calibrate layer by layer: ``process(ctx)`` quantizes layer i, whose outputs then feed layer i+1.

    With ``fp_inputs`` a second stream carries the full-precision model's hidden states (``ctx.fp_inputs``); it
    advances through the layer's floating-point snapshot (``ctx.snapshot_fp``, which ``process`` must take).
    """
    quant, _ = target_linears(model, scheme)
    quant_set = set(quant)
    prefix = layers_prefix(model)
    was_training = model.training
    model.eval()
    hidden, kwargs = capture_layer_inputs(model, input_ids, batch_size)
    fp_hidden = list(hidden) if fp_inputs else None  # the two streams coincide before the first layer
    layers = decoder_layers(model)
    targets_of = [[n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and f"{prefix}.{i}.{n}" in quant_set]
                  for i, layer in enumerate(layers)]
    # the layers after the last one with something to quantize only pass hidden states on: stop there
    last = max((i for i, t in enumerate(targets_of) if t), default=-1)
    for i, layer in enumerate(tqdm(layers[: last + 1], desc=desc, leave=False)):
        lname = f"{prefix}.{i}"
        targets = targets_of[i]
        ctx = LayerContext(i, lname, layer, hidden, kwargs[i], targets, fp_inputs=fp_hidden)
        if fp_inputs and not targets:  # nothing to quantize here: the layer is its own FP snapshot
            ctx.fp_layer = layer
        process(ctx)
        if fp_hidden is not None:
            if ctx.fp_layer is None:
                raise RuntimeError(f"layer {lname}: the rounding did not take its floating-point snapshot")
            if ctx.fp_outputs is not None:  # computed with the FP linear inputs
                fp_hidden = ctx.fp_outputs
            else:
                with torch.no_grad():
                    fp_hidden = [_layer_output(ctx.fp_layer(x, **kw)) for x, kw in zip(fp_hidden, kwargs[i])]
        hidden = ctx.forward()
        del ctx
    model.train(was_training)


class LayerwiseQuantizer(Quantizer):
    """Base of the methods that quantize decoder layer by layer through ``run_sequential``.

    Linears outside the decoder layers that the scheme does not keep in floating point (the lm_head, when
    ``quant.keep_fp`` is emptied) are quantized with RTN after the loop.
    """

    requires_calibration = True
    calib_batch_size: int = 8
    carries_fp_inputs: bool = False  # the loop carries the full-precision stream too (asymmetric calibration)

    @abstractmethod
    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        """Quantize ``ctx.targets`` of one layer in place; return their quantized forms by relative name."""

    def prepare(self, model: nn.Module, calibration: Any) -> None:
        """Hook for whole-model transforms before the layer loop (rotations, norm folding)."""

    def quantize(self, model: nn.Module, calibration: Any) -> QuantResult:
        if calibration is None:
            raise ValueError(f"method {self.name} needs calibration data")
        result = QuantResult()
        self.prepare(model, calibration)

        def process(ctx: LayerContext) -> None:
            for rel, qw in self.quantize_layer(ctx).items():
                result.layers[f"{ctx.name}.{rel}"] = qw

        run_sequential(model, calibration.input_ids, self.scheme, process, self.calib_batch_size, desc=self.name,
                       fp_inputs=self.carries_fp_inputs)
        quant, keep = target_linears(model, self.scheme)
        mods = linear_layers(model)
        for name in quant:
            if name not in result.layers:  # outside the decoder layers
                qw = rtn_quantize(mods[name].weight.data, self.scheme.w_bits, self.scheme.group_size, self.scheme.sym)
                set_linear_weight(mods[name], qw)
                result.layers[name] = qw
        result.kept_fp = keep
        return result
