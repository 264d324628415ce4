"""Packed MXFP4 / NVFP4 weights and ``FP4Linear``, their torch dequantize-matmul path.

Layout (the one FP4 hardware reads, row-major along the input dimension):
- codes: two E2M1 codes per byte, the even column in the low nibble: ``(out, in // 2)`` uint8;
- block scales, one byte each: MXFP4's E8M0 exponent (``log2(scale) + 127``), NVFP4's FP8 E4M3 bit pattern:
  ``(out, in // block)`` uint8;
- NVFP4's fp32 tensor scale.
So a packed MXFP4 weight takes 4.25 bits per element and an NVFP4 one 4.5 (+ 4 bytes), as ``FP4Weight.storage_bits``
counts. The Triton kernels (``triton_kernels.py``) cover the integer formats only: ``FP4Linear`` runs the torch path
on every device and refuses ``backend="triton"`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.fp4 import FP4Weight, e2m1_decode, fp4_weight
from ptqbench.scheme import FP4_GROUP

E8M0_BIAS = 127


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) 4-bit codes → (out, in // 2) uint8, column 2j in the low nibble and 2j+1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, not {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: (out, in // 2) uint8 → (out, in) uint8 codes."""
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # (out, in // 2, 2)
    return out.reshape(*packed.shape[:-1], -1)


def encode_scales(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Stored block scales (float32: powers of two / E4M3 values) → one byte each."""
    if fmt == "mxfp4":
        e = torch.log2(scales.float())
        if not torch.equal(e, e.round()):
            raise ValueError("MXFP4 scales must be powers of two (E8M0)")
        return (e.round().long() + E8M0_BIAS).clamp(0, 254).to(torch.uint8)
    f8 = scales.float().to(torch.float8_e4m3fn)
    if not torch.equal(f8.float(), scales.float()):
        raise ValueError("NVFP4 scales must be FP8 E4M3 values")
    return f8.view(torch.uint8)


def decode_scales(b: torch.Tensor, fmt: str) -> torch.Tensor:
    """One byte per block scale → float32 (inverse of ``encode_scales``)."""
    if fmt == "mxfp4":
        return torch.exp2(b.long().float() - E8M0_BIAS)
    return b.view(torch.float8_e4m3fn).float()


@dataclass
class PackedFP4Weight:
    """An ``FP4Weight`` packed in the hardware layout above; ``unpack`` gives it back exactly."""

    qweight: torch.Tensor  # (out, in // 2) uint8
    scales: torch.Tensor  # (out, in // block) uint8
    tscale: float
    fmt: str
    in_features: int

    @classmethod
    def from_fp4(cls, qw: FP4Weight) -> "PackedFP4Weight":
        g = FP4_GROUP[qw.fmt]
        natural = torch.arange(qw.shape[1]) // g
        if not torch.equal(qw.g_idx.long().cpu(), natural):
            raise ValueError(f"{qw.fmt} packing needs contiguous blocks of {g} (g_idx = j // {g})")
        return cls(pack_nibbles(qw.qweight), encode_scales(qw.scales, qw.fmt), qw.tscale, qw.fmt, qw.shape[1])

    def unpack(self) -> FP4Weight:
        return fp4_weight(unpack_nibbles(self.qweight), decode_scales(self.scales, self.fmt), self.fmt, self.tscale)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() + (4 if self.fmt == "nvfp4" else 0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) from the packed bytes: E2M1 value × block scale × tensor scale."""
        g = FP4_GROUP[self.fmt]
        vals = e2m1_decode(unpack_nibbles(self.qweight))  # (out, in)
        s = decode_scales(self.scales, self.fmt) * self.tscale  # (out, blocks)
        return (vals.reshape(vals.shape[0], -1, g) * s[..., None]).reshape(vals.shape).to(dtype)


class FP4Linear(nn.Module):
    """``y = x @ dequant(W).T + bias`` with W kept packed (MXFP4/NVFP4); torch path only (see the module docstring)."""

    def __init__(self, weight: FP4Weight | PackedFP4Weight, bias: torch.Tensor | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        if backend == "triton":
            raise ValueError(f"backend='triton': unsupported format {getattr(weight, 'fmt', '?')} (the Triton kernels "
                             f"cover integer formats): use backend='auto' or 'torch'")
        packed = weight if isinstance(weight, PackedFP4Weight) else PackedFP4Weight.from_fp4(weight)
        self.fmt, self.tscale = packed.fmt, packed.tscale
        self.in_features, self.out_features = packed.in_features, packed.qweight.shape[0]
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.last_backend: str | None = None

    @property
    def packed(self) -> PackedFP4Weight:
        return PackedFP4Weight(self.qweight, self.scales, self.tscale, self.fmt, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_backend = "torch"
        w = self.packed.dequantize(torch.float32).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"
