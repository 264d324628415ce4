"""Activation fake-quantization at the inputs of the quantized linears (weight × activation schemes).

``dynamic_per_token``: each token's input vector gets its own range at run time. ``static_per_tensor``: one
scale per linear, fixed from the calibration set's absolute maximum (SmoothQuant's static W8A8 setting).

A stage whose activation format is its own (RPTQ's static per-cluster ranges on reordered channels) leaves a
quantizer on the linear with ``set_activation_quantizer`` while it quantizes; ``attach_activation_quant`` then inserts
that one instead of the scheme's. Linears without one get the scheme's quantizer, exactly as before.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ptqbench.models import linear_layers
from ptqbench.scheme import QuantScheme, quantize_activation


class _ActQuantHook:
    def __init__(self, bits: int, mode: str, sym: bool, scale: torch.Tensor | None, fmt: str = "int") -> None:
        self.bits, self.mode, self.sym, self.scale, self.fmt = bits, mode, sym, scale, fmt

    def __call__(self, _mod: nn.Module, args: tuple) -> tuple:
        x = quantize_activation(args[0], self.bits, self.mode, self.sym, self.scale, self.fmt)
        return (x, *args[1:])


# the attribute under which a stage leaves a linear's own activation quantizer (a plain attribute: not a submodule,
# so the state dict, the parameter count and the memory accounting do not see it)
_OWN_QUANTIZER = "_ptqbench_act_quantizer"


def set_activation_quantizer(linear: nn.Module, quantizer: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give ``linear`` its own activation quantizer ``x (..., in) -> x̂``, used by ``attach_activation_quant`` in
    place of the scheme's (a stage calls this while it quantizes; nothing runs until the quantizers are attached)."""
    object.__setattr__(linear, _OWN_QUANTIZER, quantizer)


def activation_quantizer(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The quantizer a stage left on ``linear``, or None (the scheme's then applies)."""
    return linear.__dict__.get(_OWN_QUANTIZER)


class _OwnActQuantHook:
    """Forward pre-hook applying a stage's own quantizer to the linear's input."""

    def __init__(self, quantizer: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.quantizer = quantizer

    def __call__(self, _mod: nn.Module, args: tuple) -> tuple:
        return (self.quantizer(args[0]), *args[1:])


@torch.no_grad()
def static_scales(model: nn.Module, names: list[str], input_ids: torch.Tensor, bits: int,
                  batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Per-tensor scales ``absmax / (2**(bits-1) - 1)`` of each named linear's input over the calibration set.

    One window per forward by default: on SmolLM2 (32 x 512 tokens, 2 threads) batches of 8 raised the cell's peak
    host memory by 1.4-2.4 GiB against 0.03 GiB for batches of 1, at the same wall time (~26 s).
    """
    mods = linear_layers(model)
    amax = {n: torch.zeros((), device=mods[n].weight.device) for n in names}

    def track(n: str):
        def hook(_m: nn.Module, a: tuple) -> None:
            # aminmax reads the input once, without materialising an |x| copy
            lo, hi = torch.aminmax(a[0].detach())
            amax[n] = torch.maximum(amax[n], torch.maximum(-lo, hi).float())
        return hook

    handles = [mods[n].register_forward_pre_hook(track(n)) for n in names]
    device = next(model.parameters()).device
    # the decoder alone when every hooked linear lives in it: the lm_head's logits (batch x seq x vocab floats,
    # ~0.8 GB for 8 x 512 x 49152) would otherwise dominate the peak memory of calibration
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    inside = decoder is not None and {id(mods[n]) for n in names} <= {id(m) for m in decoder.modules()}
    runner = decoder if inside else model
    try:
        for chunk in input_ids.split(batch_size):
            runner(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    maxq = 2 ** (bits - 1) - 1
    return {n: (a / maxq).clamp_min(1e-8) for n, a in amax.items()}


def attach_activation_quant(model: nn.Module, names: list[str], scheme: QuantScheme,
                            input_ids: torch.Tensor | None = None) -> int:
    """Insert activation quantizers before the named linears; returns how many were attached.

    A linear that a stage gave its own quantizer (``set_activation_quantizer``) gets that one; the others get the
    scheme's (``a_mode``: per-token dynamic, or a static per-tensor scale calibrated on ``input_ids``).
    """
    if scheme.a_bits >= 16:
        return 0
    mods = linear_layers(model)
    own = {n: q for n in names if (q := activation_quantizer(mods[n])) is not None}
    rest = [n for n in names if n not in own]
    scales: dict[str, torch.Tensor] = {}
    if scheme.a_mode == "static_per_tensor" and rest:
        if input_ids is None:
            raise ValueError("static per-tensor activation quantization needs calibration data")
        scales = static_scales(model, rest, input_ids, scheme.a_bits)
    for n in names:
        hook = _OwnActQuantHook(own[n]) if n in own else \
            _ActQuantHook(scheme.a_bits, scheme.a_mode, scheme.a_sym, scales.get(n), scheme.a_format)
        mods[n].register_forward_pre_hook(hook)
    return len(names)


# ------------------------------------------------------------------------------------------------ per-cluster
def cluster_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric ``(scale, zero)`` of ranges ``[lo, hi]`` on ``2^bits`` levels: ``scale = (hi - lo)/(2^bits - 1)``,
    integer ``zero = round(-lo/scale)``. The range need not contain 0 (a cluster may lie in [-100, -50]); the zero
    point is then outside ``[0, 2^bits - 1]``, an integer offset all the same."""
    maxq = 2**bits - 1
    scale = ((hi.float() - lo.float()) / maxq).clamp_min(1e-8)
    return scale, torch.round(-lo.float() / scale)


def quantize_clusters(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``x`` (..., in) with a static ``scale``/``zero`` per input channel (in,):
    ``(clamp(round(x/s) + z, 0, 2^bits - 1) - z)·s``, in ``x``'s dtype."""
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).to(x.dtype)


class ClusterActQuantizer:
    """Static asymmetric activation quantizer with one calibrated range per contiguous channel cluster (RPTQ).

    ``counts`` (clusters,): sizes of the contiguous clusters, in channel order (they sum to the input width);
    ``lo``/``hi`` (clusters,): each cluster's calibrated range. Every channel of a cluster shares its scale and zero.
    """

    def __init__(self, bits: int, counts: list[int], lo: torch.Tensor, hi: torch.Tensor) -> None:
        if len(counts) != lo.numel() or len(counts) != hi.numel() or min(counts) < 1:
            raise ValueError(f"ClusterActQuantizer: {len(counts)} cluster sizes (all ≥ 1) for {lo.numel()} ranges")
        self.bits = bits
        self.counts = [int(c) for c in counts]
        self.lo, self.hi = lo.detach().float().clone(), hi.detach().float().clone()
        reps = torch.tensor(self.counts, device=self.lo.device)
        s, z = cluster_qparams(self.lo, self.hi, bits)
        self.scale = s.repeat_interleave(reps)  # (in,) per channel
        self.zero = z.repeat_interleave(reps)

    @property
    def n_clusters(self) -> int:
        return len(self.counts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale.device != x.device:
            self.scale, self.zero = self.scale.to(x.device), self.zero.to(x.device)
        return quantize_clusters(x, self.scale, self.zero, self.bits)
