"""Microscaling FP4 formats: E2M1 values with block scales (MXFP4, NVFP4), as pure tensor functions.

- E2M1 (the element type of both formats): sign, 2 exponent bits, 1 mantissa bit; the magnitudes are
  {0, 0.5, 1, 1.5, 2, 3, 4, 6}. A code is ``sign << 3 | index`` (4 bits); rounding is to nearest, ties to the even
  index (round-half-to-even on the mantissa, as the hardware converts), saturating at ±6.
- MXFP4 (OCP Microscaling Formats v1.0): one E8M0 scale (a power of two, 8 bits) per block of 32 elements:
  4 + 8/32 = 4.25 bits per weight.
- NVFP4 (NVIDIA Blackwell): one FP8 E4M3 scale per block of 16 elements and one fp32 scale per tensor: 4 + 8/16 = 4.5
  bits per weight + 32 bits per tensor. The tensor scale ``amax / (6 · 448)`` maps the largest block scale onto
  E4M3's largest finite value, so every block scale is an E4M3 number times the tensor scale.

Block scales (``scale_search``):
- ``minmax``: cover the block's largest magnitude. MXFP4 rounds ``amax / 6`` *up* to a power of two (nothing is
  clipped; the OCP reference rule ``2^(floor(log2 amax) − 2)`` may clip up to ``amax`` ∈ [6, 8)·scale to 6·scale and
  is one of the ``mse`` candidates); NVFP4 rounds ``amax / 6`` to the nearest E4M3 value (NVIDIA's recipe).
- ``mse``: per block, the candidate with the least squared error of the block's fake-quantized values: MXFP4
  {2^e, 2^(e−1)} around the min-max exponent e; NVFP4 E4M3(``amax / 6 · f``) for f in 1, 0.95, ..., 0.7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.scheme import FP4_GROUP, QuantizedWeight, group_index

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN = 2.0**-9  # smallest positive (subnormal) E4M3 value
NV_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
SCALE_BITS = 8  # both formats store 8-bit block scales
TENSOR_SCALE_BITS = {"mxfp4": 0, "nvfp4": 32}

_MIDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # midpoints between consecutive magnitudes


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values (16,) float32: codes 0-7 positive magnitudes, 8-15 the same negated."""
    mag = torch.tensor(E2M1, device=device)
    return torch.cat([mag, -mag])


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, same shape) of ``y`` already divided by its scale: nearest E2M1 value, ties to even, saturated."""
    a = y.abs().float()
    mids = _MIDS.to(a.device)
    idx = torch.bucketize(a, mids)  # a == mids[k] lands on k, the lower neighbour
    tie_odd = (idx < 7) & (a == mids[idx.clamp(max=6)]) & (idx % 2 == 1)
    idx = idx + tie_odd.long()  # ties go to the even index (even mantissa)
    return (idx | ((y < 0).long() << 3)).to(torch.uint8)


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """The E2M1 value nearest to ``y`` (same rounding as ``e2m1_encode``) by arithmetic: the grid's step is 0.5 below 2,
    1 below 4 and 2 up to 6, and ``torch.round`` ties to even, which is the even mantissa on each segment. About half
    the cost of encode + decode, for column loops such as GPTQ's."""
    a = y.abs()
    v = torch.where(a < 2, torch.round(a * 2) * 0.5, torch.where(a < 4, torch.round(a), torch.round(a * 0.5) * 2))
    return v.clamp_(max=E2M1_MAX).copysign_(y)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Values (float32) of E2M1 codes."""
    return e2m1_table(codes.device)[codes.long()]


def e4m3_round(s: torch.Tensor) -> torch.Tensor:
    """Nearest FP8 E4M3 value (float32), saturated to ±448 (torch's cast rounds to nearest even)."""
    return s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def e8m0_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ ``s`` (float32), within E8M0's exponents [-127, 127]."""
    return torch.exp2(torch.ceil(torch.log2(s.clamp_min(2.0**-127))).clamp(-127, 127))


def tensor_scale(w: torch.Tensor, fmt: str) -> float:
    """NVFP4's per-tensor fp32 scale ``amax / (6 · 448)`` (1.0 for MXFP4, which has none)."""
    if fmt != "nvfp4":
        return 1.0
    amax = float(w.abs().max())
    return amax / (E2M1_MAX * E4M3_MAX) if amax > 0 else 1.0


def _fake(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``blocks`` (..., g) with per-block ``scale`` (..., 1)."""
    return e2m1_decode(e2m1_encode(blocks / scale)) * scale


def block_scales(blocks: torch.Tensor, fmt: str, search: str = "minmax", tscale: float = 1.0) -> torch.Tensor:
    """Per-block stored scales (..., 1) float32 of ``blocks`` (..., g); a block's scale is this times ``tscale``.

    MXFP4: powers of two (``tscale`` 1); NVFP4: E4M3 values, ``tscale`` the tensor scale. Never zero (a zero block
    gets the format's smallest scale, so dividing by it is safe and its codes are 0).
    """
    b = blocks.float()
    amax = b.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    if fmt == "mxfp4":
        base = e8m0_ceil(amax / E2M1_MAX)
        if search == "minmax":
            return base
        cands = [base, (base / 2).clamp_min(2.0**-127)]
    elif fmt == "nvfp4":
        def nv(f: float) -> torch.Tensor:
            return e4m3_round(amax * f / (E2M1_MAX * tscale)).clamp_min(E4M3_MIN)
        if search == "minmax":
            return nv(1.0)
        cands = [nv(f) for f in NV_SEARCH]
    else:
        raise ValueError(f"unknown FP4 format {fmt!r}: use mxfp4 or nvfp4")
    errs = torch.stack([((_fake(b, c * tscale) - b) ** 2).sum(-1, keepdim=True) for c in cands])  # (C, ..., 1)
    best = errs.argmin(0, keepdim=True)  # (1, ..., 1): the first of equal errors, i.e. the min-max one
    return torch.gather(torch.stack(cands), 0, best)[0]


def fp4_fake_quant(x: torch.Tensor, fmt: str, search: str = "minmax", tscale: float | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (..., features) in blocks of the format's size along the last dimension.

    Activations: ``tscale=None`` takes NVFP4's tensor scale from ``x`` itself (dynamic, at run time).
    """
    g = FP4_GROUP[fmt]
    if x.shape[-1] % g:
        raise ValueError(f"{fmt} needs the last dimension ({x.shape[-1]}) to be a multiple of {g}")
    ts = tensor_scale(x, fmt) if tscale is None else tscale
    b = x.float().reshape(*x.shape[:-1], -1, g)  # (..., blocks, g)
    return _fake(b, block_scales(b, fmt, search, ts) * ts).reshape(x.shape).to(x.dtype)


@dataclass
class FP4Weight(QuantizedWeight):
    """One linear in an FP4 format: E2M1 codes (out, in) uint8, stored block scales (out, n_blocks) float32 (powers
    of two for MXFP4, E4M3 values for NVFP4), NVFP4's tensor scale; no zero points (the grid is symmetric)."""

    fmt: str = "mxfp4"
    tscale: float = 1.0

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return e2m1_decode(self.qweight) * (self.scales[:, g].float() * self.tscale)

    def storage_bits(self) -> int:
        """4-bit codes + 8-bit block scales (+ NVFP4's fp32 tensor scale)."""
        out, inp = self.shape
        return out * inp * 4 + out * self.scales.shape[1] * SCALE_BITS + TENSOR_SCALE_BITS[self.fmt] + self.extra_bits

    def packed_module(self, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.nn.Module:
        """The packed path (``swap_to_quant_linear``): ``FP4Linear`` on the hardware layout."""
        from ptqbench.kernels.fp4_packing import FP4Linear

        return FP4Linear(self, bias, backend)

    def packed_nbytes(self) -> int:
        """Bytes of the packed layout (``ptqbench.kernels.fp4_packing``)."""
        from ptqbench.kernels.fp4_packing import PackedFP4Weight

        return PackedFP4Weight.from_fp4(self).nbytes


def fp4_quantize(w: torch.Tensor, fmt: str, search: str = "minmax") -> FP4Weight:
    """Round-to-nearest of ``w`` (out, in) onto the format's grid, blocks of the format's size along the input."""
    g = FP4_GROUP[fmt]
    out, inp = w.shape
    if inp % g:
        raise ValueError(f"{fmt} needs in_features ({inp}) to be a multiple of {g}")
    ts = tensor_scale(w, fmt)
    b = w.float().reshape(out, inp // g, g)  # (out, blocks, g)
    s = block_scales(b, fmt, search, ts)  # (out, blocks, 1)
    codes = e2m1_encode(b / (s * ts)).reshape(out, inp)
    return fp4_weight(codes, s[..., 0], fmt, ts)


def fp4_weight(codes: torch.Tensor, scales: torch.Tensor, fmt: str, tscale: float,
               g_idx: torch.Tensor | None = None) -> FP4Weight:
    """An ``FP4Weight`` from codes (out, in) and stored block scales (out, n_blocks) (``g_idx``: natural layout)."""
    g = FP4_GROUP[fmt]
    if g_idx is None:
        g_idx = group_index(codes.shape[1], g, codes.device)
    return FP4Weight(codes.to(torch.uint8).cpu(), scales.float().cpu(), torch.zeros(codes.shape[0], 0, dtype=torch.uint8),
                     4, g, g_idx.to(torch.int32).cpu(), True, fmt=fmt, tscale=float(tscale))
