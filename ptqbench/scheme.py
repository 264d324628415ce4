"""Quantization scheme and the pure tensor helpers every method shares.

Integer format (shared by every method, the packed formats in ``ptqbench.kernels`` and memory accounting):
unsigned codes ``q`` in ``[0, 2**bits - 1]``, one ``scale`` and one integer ``zero`` per (output row, group of
``group_size`` input columns); ``w ≈ (q - zero) * scale``. Symmetric schemes use the same format with the zero fixed
at the middle code ``2**(bits-1)`` (GPTQ's convention), so kernels need a single path.

Groups: ``group_size = -1`` means one group per output row (per-channel). When ``group_size`` does not divide the
input features the last group is shorter (a partial group); ``QuantScheme.check_layer`` refuses that unless
``partial_group=true``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

from typing import Iterator

import torch

from ptqbench.errors import ConfigError

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACT_BITS = (3, 4, 8, 16)  # 3: only methods with per-cluster activation ranges (RPTQ) accept it
ACT_MODES = ("dynamic_per_token", "static_per_tensor")
FORMATS = ("int", "mxfp4", "nvfp4")  # int: the integer grid above; mxfp4/nvfp4: ptqbench.fp4
FP4_GROUP = {"mxfp4": 32, "nvfp4": 16}  # elements per block scale, fixed by each format
SCALE_SEARCHES = ("minmax", "mse")


@dataclass(frozen=True)
class QuantScheme:
    """Bit-width scheme of one cell (the ``quant=`` config group)."""

    w_bits: int = 4
    group_size: int = 64  # -1: per output channel
    sym: bool = False
    a_bits: int = 16  # 16: activations stay in floating point
    a_mode: str = "dynamic_per_token"
    a_sym: bool = True
    partial_group: bool = False  # allow a shorter last group when group_size does not divide in_features
    keep_fp: tuple[str, ...] = ("lm_head",)  # linear-name substrings left unquantized (embeddings always are)
    name: str = ""
    w_format: str = "int"  # int | mxfp4 | nvfp4 (E2M1 values with the format's block scales)
    a_format: str = "int"  # int | mxfp4 | nvfp4: the activations' grid when a_bits < 16
    scale_search: str = "minmax"  # FP4 block scales: minmax (cover the block's max) or mse (least squared error)

    def __post_init__(self) -> None:
        if self.w_bits != 16 and self.w_bits not in WEIGHT_BITS:
            raise ConfigError(f"quant.w_bits={self.w_bits} is not supported: use 2-8, or 16 for no weight quantization")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"quant.group_size={self.group_size}: use a positive group size or -1 (per channel)")
        if self.a_bits not in ACT_BITS:
            raise ConfigError(f"quant.a_bits={self.a_bits} is not supported: use one of {ACT_BITS}")
        if self.a_mode not in ACT_MODES:
            raise ConfigError(f"quant.a_mode={self.a_mode!r} is not supported: use one of {ACT_MODES}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        for what, fmt in (("w_format", self.w_format), ("a_format", self.a_format)):
            if fmt not in FORMATS:
                raise ConfigError(f"quant.{what}={fmt!r} is not supported: use one of {list(FORMATS)}")
        if self.scale_search not in SCALE_SEARCHES:
            raise ConfigError(f"quant.scale_search={self.scale_search!r}: use one of {list(SCALE_SEARCHES)}")
        if self.w_format == "int" and self.scale_search != "minmax":
            raise ConfigError(f"quant.scale_search={self.scale_search} chooses FP4 block scales: integer grids take "
                              f"their range from the method's range stage (e.g. method=clip+gptq); leave it minmax")
        if self.w_format != "int":
            if self.w_bits != 4:
                raise ConfigError(f"quant.w_format={self.w_format} stores 4-bit E2M1 values: set quant.w_bits=4")
            if self.group_size != FP4_GROUP[self.w_format]:
                raise ConfigError(f"quant.group_size={self.group_size}: {self.w_format} fixes blocks of "
                                  f"{FP4_GROUP[self.w_format]} elements: set quant.group_size="
                                  f"{FP4_GROUP[self.w_format]}")
        if self.a_format != "int" and self.a_bits < 16:
            if self.a_bits != 4:
                raise ConfigError(f"quant.a_format={self.a_format} is a 4-bit format: set quant.a_bits=4")
            if self.a_mode != "dynamic_per_token":
                raise ConfigError(f"quant.a_format={self.a_format} scales each block at run time: "
                                  f"set quant.a_mode=dynamic_per_token")

    @property
    def label(self) -> str:
        """Short human label such as ``w4g64`` or ``w8a8``."""
        mse = "_mse" if self.w_format != "int" and self.scale_search == "mse" else ""
        if self.name:
            return self.name + ("" if "mse" in self.name else mse)
        a = "" if self.a_bits == 16 else f"a{self.a_bits}"
        if self.w_format != "int":  # the format fixes bits, groups and symmetry
            return f"{self.w_format}{a}{mse}"
        g = "" if self.w_bits == 16 else ("c" if self.group_size == -1 else f"g{self.group_size}")
        return f"w{self.w_bits}{a}{g}{'s' if self.sym else ''}"

    def groups_for(self, in_features: int) -> int:
        """Number of groups along the input dimension of a layer with ``in_features`` columns."""
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse a group size that does not divide ``in_features`` unless partial groups are allowed."""
        if self.group_size == -1 or in_features % self.group_size == 0 or self.partial_group:
            return
        divisors = [g for g in (32, 64, 96, 128, 192, 256) if in_features % g == 0]
        raise ConfigError(
            f"group_size={self.group_size} does not divide in_features={in_features} of {name}: "
            f"use quant.group_size in {divisors or [-1]} or set quant.partial_group=true"
        )


@contextmanager
def few_threads(t: torch.Tensor, n: int = 1) -> Iterator[None]:
    """Run column-by-column loops of tiny CPU ops on one thread: thread hand-offs cost more than the ops."""
    if t.device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def qmax(bits: int) -> int:
    return 2**bits - 1


def _groups(w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Split ``w`` (out, in) into column groups; the last one may be shorter."""
    if group_size == -1 or group_size >= w.shape[1]:
        return [w]
    return list(torch.split(w, group_size, dim=1))


def compute_qparams(
    w: torch.Tensor, bits: int, sym: bool, clip_ratio: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero for each row of ``w`` (rows, cols) → ``(rows,)`` each.

    ``clip_ratio`` shrinks the range (a float, or a ``(rows,)`` tensor for per-row clipping searches).
    """
    w = w.float()
    maxq = qmax(bits)
    if sym:
        amax = w.abs().amax(dim=1) * clip_ratio
        scale = (2 * amax / maxq).clamp_min(1e-8)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        wmin = (w.amin(dim=1) * clip_ratio).clamp(max=0)
        wmax = (w.amax(dim=1) * clip_ratio).clamp(min=0)
        scale = ((wmax - wmin) / maxq).clamp_min(1e-8)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` (rows, cols) with per-row ``scale``/``zero`` (rows,) or (rows, 1)."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, qmax(bits))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize ``w`` (rows, cols) with per-row parameters."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def group_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``scales`` and ``zeros`` of shape (out, n_groups) for ``w`` (out, in)."""
    params = [compute_qparams(g, bits, sym) for g in _groups(w, group_size)]
    return torch.stack([p[0] for p in params], 1), torch.stack([p[1] for p in params], 1)


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``g_idx`` (in,) of the natural layout: column j belongs to group j // group_size."""
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // gs


def quantize_weight(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, g_idx: torch.Tensor
) -> torch.Tensor:
    """Codes (out, in) uint8 of ``w`` given per-group ``scales``/``zeros`` (out, n_groups) and ``g_idx`` (in,)."""
    s, z = scales[:, g_idx], zeros[:, g_idx]  # (out, in)
    return torch.clamp(torch.round(w.float() / s) + z, 0, qmax(bits)).to(torch.uint8)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Float weight (out, in) from codes (out, in) and per-group ``scales``/``zeros`` (out, n_groups)."""
    return (q.float() - zeros[:, g_idx].float()) * scales[:, g_idx].float()


@dataclass
class QuantizedWeight:
    """One linear's quantized form: what kernels pack and memory accounting counts.

    ``g_idx`` maps each input column to its group; it is ``j // group_size`` except after GPTQ's act-order
    without static groups, where groups follow the permuted column order.
    ``extra_bits`` counts storage beyond codes + scales + zeros (e.g. PB-LLM's salient bitmap), in bits.
    """

    qweight: torch.Tensor  # (out, in) uint8 codes
    scales: torch.Tensor  # (out, n_groups) float16
    zeros: torch.Tensor  # (out, n_groups) uint8 integer zero points
    bits: int
    group_size: int  # -1: per output channel
    g_idx: torch.Tensor  # (in,) int32
    sym: bool = False
    extra_bits: int = 0
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_float(
        cls, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, sym: bool,
        g_idx: torch.Tensor | None = None,
    ) -> "QuantizedWeight":
        """Build from a fake-quantized weight and its parameters (codes recomputed exactly)."""
        if g_idx is None:
            g_idx = group_index(w_q.shape[1], group_size, w_q.device)
        q = quantize_weight(w_q, scales, zeros, bits, g_idx)
        return cls(q.cpu(), scales.to(torch.float16).cpu(), zeros.to(torch.uint8).cpu(), bits, group_size,
                   g_idx.to(torch.int32).cpu(), sym)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.g_idx.long())

    def storage_bits(self) -> int:
        """Bits to store this layer: codes + fp16 scales + packed zeros (+ extras; sym stores no zeros)."""
        out, inp = self.shape
        n_groups = self.scales.shape[1]
        zero_bits = 0 if self.sym else out * n_groups * self.bits
        return out * inp * self.bits + out * n_groups * 16 + zero_bits + self.extra_bits


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest with min-max range per group: the baseline every method is compared with."""
    scales, zeros = group_qparams(w, bits, group_size, sym)  # (out, n_groups)
    g_idx = group_index(w.shape[1], group_size, w.device)
    q = quantize_weight(w, scales, zeros, bits, g_idx)
    return QuantizedWeight(q.cpu(), scales.to(torch.float16).cpu(), zeros.to(torch.uint8).cpu(), bits, group_size,
                           g_idx.to(torch.int32).cpu(), sym)


def rtn_fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """RTN quantize-dequantize ``w`` (out, in) with min-max groups along the input (``compute_qparams`` +
    ``fake_quantize`` in one pass of in-place ops: search loops such as AWQ's run it 20 times per group and layer)."""
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


def quantize_activation(x: torch.Tensor, bits: int, mode: str, sym: bool = True,
                        static_scale: torch.Tensor | None = None, fmt: str = "int") -> torch.Tensor:
    """Fake-quantize activations ``x`` (..., features): per-token dynamic, or per-tensor with a static scale;
    ``fmt`` ``mxfp4``/``nvfp4``: E2M1 blocks along the features, scales chosen at run time (``ptqbench.fp4``)."""
    if bits >= 16:
        return x
    if fmt != "int":
        from ptqbench.fp4 import fp4_fake_quant  # (ptqbench.fp4 builds on this module)

        return fp4_fake_quant(x, fmt)
    if mode == "static_per_tensor":
        if static_scale is None:
            raise ValueError("static_per_tensor activation quantization needs a calibrated scale")
        maxq = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(x / static_scale), -maxq - 1, maxq) * static_scale
    xf = x.float()
    if sym:
        maxq = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(dim=-1, keepdim=True) / maxq).clamp_min(1e-8)
        return (torch.clamp(torch.round(xf / scale), -maxq - 1, maxq) * scale).to(x.dtype)
    maxq = 2**bits - 1
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(xf / scale) + zero, 0, maxq) - zero) * scale).to(x.dtype)
