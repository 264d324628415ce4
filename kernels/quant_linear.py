"""``QuantLinear``: an ``nn.Linear`` replacement that keeps its weight packed and computes with it.

On a CUDA device with float16/bfloat16 activations it calls the Triton dequantize-matmul kernels; otherwise (CPU,
float32 activations, a weight the kernels cannot tile) it unpacks and dequantizes with torch on every call, so the
packed format itself is what runs, on any machine. ``swap_to_quant_linear`` puts it into a model in place of the
quantized linears, which lets perplexity be measured on the packed path and compared with the fake-quantized model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.kernels.packing import PackedWeight
from ptqbench.scheme import QuantizedWeight

BACKENDS = ("auto", "torch", "triton")


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + bias with W (out, in) stored packed.

    backend: "auto" (Triton on CUDA when the kernels support the weight and activation dtype, torch otherwise),
    "torch" (always dequantize with torch) or "triton" (always the kernel; raises where it cannot run).
    ``last_backend`` records which one the latest forward used.
    """

    def __init__(self, weight: QuantizedWeight | PackedWeight, bias: torch.Tensor | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
        packed = weight if isinstance(weight, PackedWeight) else PackedWeight.from_quantized(weight)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bits, self.group_size, self.extra_bits = packed.bits, packed.group_size, packed.extra_bits
        self.backend = backend
        self.last_backend: str | None = None
        self.register_buffer("qweight", packed.qweight)  # (out, ceil(in / 32) * bits) int32
        # fp16 scales kept as their int16 bit pattern: model.to(dtype)/.half()/.float() convert floating buffers,
        # and a round trip through bf16 would change the scales the codes were computed with
        self.register_buffer("scales_bits", packed.scales.contiguous().view(torch.int16))  # (out, n_groups)
        self.register_buffer("qzeros", packed.qzeros)  # (out, ceil(n_groups / 32) * bits) int32, None when sym
        self.register_buffer("perm", packed.perm)  # (in,) int32 act-order column order, or None
        self.register_buffer("g_idx", packed.g_idx)  # (in,) int32 only for irregular groups, or None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales_bits.view(torch.float16), self.qzeros, self.bits,
                            self.group_size, self.in_features, self.perm, self.g_idx, self.extra_bits)

    @property
    def nbytes(self) -> int:
        """Packed weight bytes (``PackedWeight.nbytes``; the bias is not counted)."""
        return self.packed.nbytes

    def _pick(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
            return "torch"
        try:
            from ptqbench.kernels.triton_kernels import unsupported_reason
        except ImportError:  # no triton installed: the torch path gives the same numbers, only slower
            return "torch"
        return "torch" if unsupported_reason(self.packed) else "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._pick(x)
        self.last_backend = backend
        if backend == "triton":
            from ptqbench.kernels.triton_kernels import quant_matmul

            y = quant_matmul(x, self.packed)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        w = self.packed.dequantize(torch.float32).to(x.dtype)  # (out, in); same arithmetic as the fake-quant path
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"sym={self.qzeros is None}, bias={self.bias is not None}, backend={self.backend}")


def swap_to_quant_linear(model: nn.Module, layers: dict[str, QuantizedWeight], backend: str = "auto") -> nn.Module:
    """Replace the named ``nn.Linear`` modules (full dotted names from ``model.named_modules()``) by ``QuantLinear``
    built from their ``QuantizedWeight``; in place, returns ``model``. Forward hooks of a replaced linear (e.g.
    activation quantizers) are carried over. Raises ValueError naming the first layer that is missing, not a
    linear, or of another shape, before changing anything."""
    targets = {}
    for name, qw in layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"swap_to_quant_linear: the model has no module {name!r} (use full names from "
                             f"model.named_modules())") from None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"swap_to_quant_linear: {name!r} is a {type(mod).__name__}, not an nn.Linear")
        if tuple(mod.weight.shape) != tuple(qw.shape):
            raise ValueError(f"swap_to_quant_linear: {name!r} has weight {tuple(mod.weight.shape)} but its "
                             f"QuantizedWeight is {tuple(qw.shape)}")
        targets[name] = mod
    for name, mod in targets.items():
        qw = layers[name]
        device = mod.weight.device
        build = getattr(qw, "packed_module", None)  # a format with parts beyond the uniform codes (GWQ's outliers)
        if build is not None:
            new = build(mod.bias, backend).to(device)
        else:
            # pack where the model lives (a GPU packs a 7B layer in milliseconds)
            qw = dataclasses.replace(qw, qweight=qw.qweight.to(device), scales=qw.scales.to(device),
                                     zeros=qw.zeros.to(device), g_idx=qw.g_idx.to(device))
            new = QuantLinear(qw, mod.bias, backend).to(device)
        new._forward_pre_hooks.update(mod._forward_pre_hooks)
        new._forward_hooks.update(mod._forward_hooks)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
