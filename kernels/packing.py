"""Packed low-bit weight format: integer codes in int32 words, fp16 group scales, zero points packed like the codes.

Layout of one output row (what the Triton kernels read):

* The ``in`` codes are padded with zeros to ``Kp = ceil(in / 32) * 32`` columns, so every 32 codes take exactly
  ``bits`` int32 words for any bit width (2, 3, 4, 8, and also 5-7) and a kernel tile of 32 columns never splits a word.
* A ``b``-bit code is stored as bit planes whose widths are the binary digits of ``b`` (8 -> [8], 4 -> [4],
  3 -> [2, 1], 6 -> [4, 2], 7 -> [4, 2, 1]). Plane ``W`` holds bits ``[lo, lo + W)`` of every code, ``32 / W`` codes
  per word, code ``k`` in word ``k // (32 / W)`` at bit ``(k % (32 / W)) * W``; ``lo`` is the sum of the wider planes.
  The planes of a row are stored one after the other, widest first. For 3 bits this is 32 codes in three words
  (two words of 2-bit low parts, one word of high bits): dense, no padding to 4 bits, and no code straddles a word,
  which keeps the kernel's unpacking to one shift and one mask per plane.
* Zero points (asymmetric schemes) are packed the same way along the group axis: ``(out, ceil(n_groups / 32) * bits)``.
  Symmetric schemes store none: their zero is the fixed middle code ``2**(bits - 1)`` (see ``ptqbench.scheme``).
* Act-order (GPTQ ``desc_act``) weights, whose ``g_idx`` is not ``j // group_size``, are stored with their columns
  sorted by group (``perm``); a kernel then reads ``x[:, perm]``. If the sorted groups are still irregular, ``g_idx``
  (in packed column order) is kept too and only the torch path can use the weight.

Words are int32 bit patterns (torch has no general uint32 arithmetic); packing goes through int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptqbench.scheme import QuantizedWeight, group_index

PACK_BITS = (2, 3, 4, 5, 6, 7, 8)  # 2, 3, 4 and 8 are the kernel targets; 5-7 come free with bit planes
CHUNK = 32  # codes per chunk: one chunk of b-bit codes is exactly b int32 words


def planes(bits: int) -> list[tuple[int, int]]:
    """``[(width, lo), ...]`` bit planes of a ``bits``-bit code, widest first; ``lo`` is the plane's lowest bit."""
    out, lo = [], 0
    for w in (8, 4, 2, 1):
        if bits & w:
            out.append((w, lo))
            lo += w
    return out


def packed_words(n_codes: int, bits: int) -> int:
    """int32 words per row for ``n_codes`` codes of ``bits`` bits (codes padded to a multiple of 32)."""
    return math.ceil(n_codes / CHUNK) * bits


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 tensor with the same bit pattern."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (rows, n) with values in [0, 2**bits) into int32 words (rows, ceil(n / 32) * bits)."""
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: use one of {PACK_BITS}")
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if n and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be packed at {bits} bits")
    kp = math.ceil(n / CHUNK) * CHUNK
    c = torch.nn.functional.pad(c, (0, kp - n))  # (rows, Kp), zero codes in the padding
    out = []
    for w, lo in planes(bits):
        per = 32 // w
        part = ((c >> lo) & (2**w - 1)).view(rows, kp // per, per)  # (rows, words, codes per word)
        shifts = torch.arange(per, device=c.device, dtype=torch.int64) * w
        out.append(_to_int32((part << shifts).sum(-1)))  # disjoint bit fields: the sum is an OR
    return torch.cat(out, dim=1) if out else codes.new_zeros((rows, 0), dtype=torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 words (rows, ceil(n / 32) * bits) -> uint8 codes (rows, n)."""
    rows = words.shape[0]
    kw = math.ceil(n / CHUNK)  # words per unit plane width
    if words.shape[1] != kw * bits:
        raise ValueError(f"packed tensor has {words.shape[1]} words per row, expected {kw * bits} for {n} "
                         f"codes of {bits} bits")
    codes = None
    for w, lo in planes(bits):
        per = 32 // w
        plane = words[:, kw * lo: kw * (lo + w)]  # (rows, Kp / per) int32
        shifts = torch.arange(per, device=words.device, dtype=torch.int32) * w
        # arithmetic >> copies the sign bit down, the mask drops it again
        part = ((plane[:, :, None] >> shifts) & (2**w - 1)).view(rows, kw * CHUNK)
        codes = part if codes is None else codes | (part << lo)
    return codes[:, :n].to(torch.uint8)


def _sorted_layout(g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(perm, g_idx_packed)`` for a column->group map: both None for the natural layout ``j // group_size``;
    ``perm`` (columns sorted by group, stable) for act-order; ``g_idx_packed`` too if sorted groups are irregular."""
    k = g_idx.numel()
    natural = group_index(k, group_size, g_idx.device)
    if torch.equal(g_idx.long(), natural):
        return None, None
    perm = torch.argsort(g_idx.long(), stable=True)
    g_sorted = g_idx.long()[perm]
    return perm.to(torch.int32), (None if torch.equal(g_sorted, natural) else g_sorted.to(torch.int32))


@dataclass
class PackedWeight:
    """One linear's weight in the packed format (module docstring). All tensors live on one device."""

    qweight: torch.Tensor  # (out, ceil(in / 32) * bits) int32 packed codes, columns in packed order
    scales: torch.Tensor  # (out, n_groups) float16
    qzeros: torch.Tensor | None  # (out, ceil(n_groups / 32) * bits) int32 packed zero points; None when sym
    bits: int
    group_size: int  # -1: per output channel
    in_features: int
    perm: torch.Tensor | None = None  # (in,) int32: packed column i is original column perm[i] (act-order)
    g_idx: torch.Tensor | None = None  # (in,) int32 group of each packed column, only when irregular
    extra_bits: int = 0  # storage the method reports beyond codes/scales/zeros, counted in nbytes

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def sym(self) -> bool:
        return self.qzeros is None

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def natural_groups(self) -> bool:
        """True when packed column j belongs to group j // group_size (what the Triton kernels tile)."""
        return self.g_idx is None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form: codes + fp16 scales + packed zeros (+ act-order permutation, irregular g_idx
        and extra bits). For (N, K) at b bits and G groups: 4*N*ceil(K/32)*b + 2*N*G + 4*N*ceil(G/32)*b (asym)."""
        tensors = (self.qweight, self.scales, self.qzeros, self.perm, self.g_idx)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + math.ceil(self.extra_bits / 8)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> "PackedWeight":
        """Pack a ``QuantizedWeight`` (codes, scales, zeros, g_idx) exactly; ``unpack`` inverts it."""
        out, inp = qw.shape
        if type(qw).dequantize is not QuantizedWeight.dequantize or qw.meta.get("packed_kernels") is False:
            # e.g. PB-LLM's salient weights: codes/scales/zeros alone would give another weight
            raise ValueError(f"{type(qw).__name__} (format {qw.meta.get('format', '?')!r}) is not the uniform "
                             f"(q - zero) * scale format: it cannot be packed")
        if qw.bits not in PACK_BITS:
            raise ValueError(f"{qw.bits}-bit weights cannot be packed: use one of {PACK_BITS}")
        if qw.g_idx.numel() != inp or qw.scales.shape[0] != out or qw.zeros.shape != qw.scales.shape:
            raise ValueError(f"inconsistent QuantizedWeight: qweight {tuple(qw.qweight.shape)}, scales "
                             f"{tuple(qw.scales.shape)}, zeros {tuple(qw.zeros.shape)}, g_idx {qw.g_idx.numel()}")
        mid = 2 ** (qw.bits - 1)
        if qw.sym and bool((qw.zeros != mid).any()):
            # storing no zeros would silently change the weight: a sym scheme must use the middle code
            raise ValueError(f"sym QuantizedWeight has zero points other than the middle code {mid}: "
                             f"quantize it with sym=False")
        perm, g_packed = _sorted_layout(qw.g_idx, qw.group_size)
        codes = qw.qweight if perm is None else qw.qweight[:, perm.long()]
        return cls(
            qweight=pack_codes(codes, qw.bits),
            scales=qw.scales.to(torch.float16).contiguous(),
            qzeros=None if qw.sym else pack_codes(qw.zeros, qw.bits),
            bits=qw.bits,
            group_size=qw.group_size,
            in_features=inp,
            perm=perm,
            g_idx=g_packed,
            extra_bits=qw.extra_bits,
        )

    def packed_g_idx(self) -> torch.Tensor:
        """Group of each packed column (in,) int64."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return group_index(self.in_features, self.group_size, self.qweight.device).long()

    def zeros(self) -> torch.Tensor:
        """Integer zero points (out, n_groups) uint8 (the fixed middle code when sym)."""
        if self.qzeros is None:
            return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.uint8)
        return unpack_codes(self.qzeros, self.bits, self.n_groups)

    def unpack(self) -> QuantizedWeight:
        """The ``QuantizedWeight`` this was packed from (columns back in their original order)."""
        codes = unpack_codes(self.qweight, self.bits, self.in_features)  # (out, in), packed column order
        g_idx = self.packed_g_idx()
        if self.perm is not None:
            inv = torch.empty_like(self.perm, dtype=torch.long)
            inv[self.perm.long()] = torch.arange(self.in_features, device=self.perm.device)
            codes, g_idx = codes[:, inv], g_idx[inv]
        return QuantizedWeight(codes, self.scales, self.zeros(), self.bits, self.group_size, g_idx.to(torch.int32),
                               self.sym, self.extra_bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight (out, in) in the original column order: (q - zero) * scale computed in fp32 (the same
        arithmetic as ``QuantizedWeight.dequantize``, so the result is bit-identical to it)."""
        q = unpack_codes(self.qweight, self.bits, self.in_features).float()  # (out, in) packed order
        s, z = self.scales.float(), self.zeros().float()  # (out, n_groups)
        if self.natural_groups:
            # broadcast over (out, n_groups, group) instead of gathering per column: same values, less memory
            gs = self.in_features if self.group_size == -1 else self.group_size
            pad = self.n_groups * gs - self.in_features  # the short last group, if any
            q3 = torch.nn.functional.pad(q, (0, pad)).view(q.shape[0], self.n_groups, gs)
            w = ((q3 - z[:, :, None]) * s[:, :, None]).view(q.shape[0], -1)[:, : self.in_features]
        else:
            g = self.packed_g_idx()
            w = (q - z[:, g]) * s[:, g]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm.long(), w)  # column perm[i] <- packed column i
        return w.to(dtype)

    def to(self, device: torch.device | str) -> "PackedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(move(self.qweight), move(self.scales), move(self.qzeros), self.bits, self.group_size,
                            self.in_features, move(self.perm), move(self.g_idx), self.extra_bits)
