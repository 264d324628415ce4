"""Triton kernels that dequantize packed low-bit weights inside the matmul: ``y = x @ dequant(W).T``.

Conventions: the weight is ``(N out, K in)`` in the packed format of ``ptqbench.kernels.packing``; ``x`` is
``(..., K)`` float16 or bfloat16; ``y`` is ``(..., N)`` in the dtype of ``x``. Accumulation is fp32.

Two paths, chosen by the number of activation rows ``M``:

* GEMV (``M <= 8``, decode): each program owns ``BLOCK_N`` output rows and streams their packed words along K
  (optionally one slice of K: split-K, partial sums added atomically into an fp32 buffer when there are too few
  row blocks to fill the GPU). Batch-1 decode is bound by HBM bandwidth, so each int32 word is loaded once
  (contiguous runs per row, 128-bit loads when strides are 16-aligned), unpacked in registers, and the group
  scale/zero are applied once per sub-tile: ``sum_k x (q - z) s = s * (sum_k x q - z * sum_k x)``, and
  ``q = sum_planes plane << lo`` for multi-plane widths. Per code that leaves a shift, a mask, a convert and an
  FMA; the tile is laid out (code-in-word axis first) so those reductions stay inside a thread.
* GEMM (``M > 8``): classic tiles ``[BLOCK_M, BLOCK_N]`` looping over K; the dequantized ``[BLOCK_K, BLOCK_N]``
  weight tile is cast to the activation dtype and fed to ``tl.dot`` (tensor cores).

Group scales/zeros are loaded once per sub-tile of ``SUB = min(group_size, BLOCK_K)`` columns, so ``BLOCK_K`` must
either divide the group size or be a multiple of it: group sizes that are powers of two, or multiples of 32, tile;
others raise (``check_tileable``). Partial last groups and per-channel scales (group_size -1) are fine.

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels are not autotuned: the caller picks a few large tiles. Whether
the kernels are interpreted is decided when this module is first imported (``triton.jit`` reads the variable then).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ptqbench.kernels.packing import PACK_BITS, PackedWeight

INTERPRET = bool(triton.knobs.runtime.interpret)  # what the kernels below were built for
GEMV_MAX_M = 8  # activation rows up to which the GEMV path is used
GEMV_BLOCK_N = 16  # output rows per GEMV program (fixed so split-K can be chosen before launch)
ACT_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _plane(w_ptr, rows, row_mask, stride_w, start, k0, KW, W: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """One bit plane of width W for columns [k0, k0 + BLOCK_K): int32 [BLOCK_N, BLOCK_K] in [0, 2**W)."""
    PER: tl.constexpr = 32 // W  # codes per word
    NW: tl.constexpr = BLOCK_K // PER  # words per row in this tile
    wi = k0 // PER + tl.arange(0, NW)
    mask = row_mask[:, None] & (wi < KW * W)[None, :]
    # one load per word (contiguous along K): no word is fetched twice
    words = tl.load(w_ptr + rows[:, None] * stride_w + (start + wi)[None, :], mask=mask, other=0)  # (BN, NW)
    shifts = tl.arange(0, PER) * W
    vals = (words[:, :, None] >> shifts[None, None, :]) & ((1 << W) - 1)  # (BN, NW, PER); mask drops sign bits
    return tl.reshape(vals, [BLOCK_N, BLOCK_K])


@triton.jit
def _load_codes(w_ptr, rows, row_mask, stride_w, k0, KW, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Codes [BLOCK_N, BLOCK_K] int32 of a tile: the sum of the bit planes of BITS (8 | 4 | 2 | 1, widest first;
    a plane's low bit ``lo`` is the sum of the wider planes, and it starts at word ``KW * lo`` of the row)."""
    codes = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    if BITS % 16 >= 8:
        codes += _plane(w_ptr, rows, row_mask, stride_w, 0, k0, KW, 8, BLOCK_N, BLOCK_K)
    if BITS % 8 >= 4:
        LO4: tl.constexpr = BITS - BITS % 8
        codes += _plane(w_ptr, rows, row_mask, stride_w, KW * LO4, k0, KW, 4, BLOCK_N, BLOCK_K) << LO4
    if BITS % 4 >= 2:
        LO2: tl.constexpr = BITS - BITS % 4
        codes += _plane(w_ptr, rows, row_mask, stride_w, KW * LO2, k0, KW, 2, BLOCK_N, BLOCK_K) << LO2
    if BITS % 2 == 1:
        LO1: tl.constexpr = BITS - 1
        codes += _plane(w_ptr, rows, row_mask, stride_w, KW * LO1, k0, KW, 1, BLOCK_N, BLOCK_K) << LO1
    return codes


@triton.jit
def _code_at(z_ptr, rows, mask, stride_z, start, g, W: tl.constexpr):
    """Plane W of the packed codes at positions g [NSUB] of each row: int32 [BLOCK_N, NSUB] (a small gather)."""
    PER: tl.constexpr = 32 // W
    word = tl.load(z_ptr + rows[:, None] * stride_z + (start + g // PER)[None, :], mask=mask, other=0)
    return (word >> ((g % PER) * W)[None, :]) & ((1 << W) - 1)


@triton.jit
def _zeros_at(z_ptr, rows, mask, stride_z, g, GW, BITS: tl.constexpr):
    """Zero points of groups g [NSUB] for rows: int32 [BLOCK_N, NSUB]; same plane layout as the codes."""
    z = rows[:, None] * 0 + g[None, :] * 0  # int32 zeros of shape (BN, NSUB)
    if BITS % 16 >= 8:
        z += _code_at(z_ptr, rows, mask, stride_z, 0, g, 8)
    if BITS % 8 >= 4:
        LO4: tl.constexpr = BITS - BITS % 8
        z += _code_at(z_ptr, rows, mask, stride_z, GW * LO4, g, 4) << LO4
    if BITS % 4 >= 2:
        LO2: tl.constexpr = BITS - BITS % 4
        z += _code_at(z_ptr, rows, mask, stride_z, GW * LO2, g, 2) << LO2
    if BITS % 2 == 1:
        LO1: tl.constexpr = BITS - 1
        z += _code_at(z_ptr, rows, mask, stride_z, GW * LO1, g, 1) << LO1
    return z


@triton.jit
def _group_params(s_ptr, z_ptr, rows, row_mask, k0, G, GW, stride_s, stride_z, BITS: tl.constexpr,
                  GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr):
    """Scales and zeros, fp32 [BLOCK_N, NSUB], of the NSUB sub-tiles of SUB columns starting at k0."""
    if GROUP > 0:
        g = (k0 + tl.arange(0, NSUB) * SUB) // GROUP  # (NSUB,) group of each sub-tile
    else:
        g = tl.arange(0, NSUB) * 0  # per channel: one group
    mask = row_mask[:, None] & (g < G)[None, :]
    s = tl.load(s_ptr + rows[:, None] * stride_s + g[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = _zeros_at(z_ptr, rows, mask, stride_z, g, GW, BITS).to(tl.float32)
    else:
        z = s * 0.0 + (1 << (BITS - 1))  # symmetric: the fixed middle code
    return s, z


@triton.jit
def _dequant(codes, s_ptr, z_ptr, rows, row_mask, k0, G, GW, stride_s, stride_z, BITS: tl.constexpr,
             GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             SUB: tl.constexpr):
    """(codes - zero) * scale in fp32 [BLOCK_N, BLOCK_K]; one scale/zero per row and sub-tile of SUB columns."""
    NSUB: tl.constexpr = BLOCK_K // SUB
    s, z = _group_params(s_ptr, z_ptr, rows, row_mask, k0, G, GW, stride_s, stride_z, BITS, GROUP, HAS_ZEROS,
                         NSUB, SUB)
    q = tl.reshape(codes.to(tl.float32), [BLOCK_N, NSUB, SUB])
    return tl.reshape((q - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_K])


@triton.jit
def _plane_words(w_ptr, rows, row_mask, stride_w, start, k0, KW, W: tl.constexpr, BLOCK_K: tl.constexpr,
                 SUB: tl.constexpr):
    """Plane W of a tile as fp32 [PER, BLOCK_N, NSUB, WPS]: element [p, n, j, i] is the plane of code
    k0 + j*SUB + i*PER + p (WPS words per sub-tile of SUB columns). The code-in-word axis comes first so that
    Triton's default layout keeps all PER codes of a word in the thread that loaded it: the GEMV then reduces
    over it with in-register FMAs instead of cross-lane shuffles."""
    PER: tl.constexpr = 32 // W
    NSUB: tl.constexpr = BLOCK_K // SUB
    WPS: tl.constexpr = SUB // PER
    wi = k0 // PER + tl.arange(0, NSUB)[:, None] * WPS + tl.arange(0, WPS)[None, :]  # (NSUB, WPS)
    words = tl.load(w_ptr + rows[:, None, None] * stride_w + (start + wi)[None, :, :],
                    mask=row_mask[:, None, None] & (wi < KW * W)[None, :, :], other=0)  # (BN, NSUB, WPS)
    words = words.to(tl.uint32, bitcast=True)  # logical shifts: no sign-extension instructions
    shifts = (tl.arange(0, PER) * W).to(tl.uint32)
    return ((words[None, :, :, :] >> shifts[:, None, None, None]) & ((1 << W) - 1)).to(tl.float32)


@triton.jit
def _plane_dot(planes, x_row, k0, k_lim, W: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr):
    """For one activation row and each sub-tile of SUB columns: sum of x[k] * plane[n, k], fp32 [BLOCK_N, NSUB],
    and sum of x[k], fp32 [NSUB]. k_lim: K, or 0 for a padding row beyond M."""
    PER: tl.constexpr = 32 // W
    NSUB: tl.constexpr = BLOCK_K // SUB
    WPS: tl.constexpr = SUB // PER
    ks = (k0 + tl.arange(0, PER)[:, None, None] + tl.arange(0, NSUB)[None, :, None] * SUB
          + tl.arange(0, WPS)[None, None, :] * PER)  # (PER, NSUB, WPS), the order of ``planes``
    x = tl.load(x_row + ks, mask=ks < k_lim, other=0.0).to(tl.float32)  # zero beyond K: padded codes vanish
    per_word = tl.sum(planes * x[:, None, :, :], axis=0)  # (BN, NSUB, WPS): in-thread FMAs
    return tl.sum(per_word, axis=2), tl.sum(tl.sum(x, axis=0), axis=1)  # (BN, NSUB), x summed per sub-tile (NSUB,)


# ---------------------------------------------------------------------------------------------- configurations
def _tiles_group(block_k: int, group: int) -> bool:
    """A K tile of block_k columns cuts a group of ``group`` columns (0: per channel) into whole sub-tiles."""
    return group <= 0 or group % block_k == 0 or (block_k % group == 0 and group & (group - 1) == 0)


def _sub(args: dict) -> int:
    g = args["GROUP"]
    return args["BLOCK_K"] if g <= 0 else min(g, args["BLOCK_K"])


def _factored(args: dict) -> bool:
    """GEMV factoring needs every packed word inside one sub-tile: SUB >= codes per word of the narrowest plane."""
    bits = args["BITS"]
    return _sub(args) >= 32 // (bits & -bits)


def _prune_gemv(configs, named_args, **kw):
    kw = {**named_args, **kw}
    keep = []
    for c in configs:
        args = {**kw, "BLOCK_K": c.kwargs["BLOCK_K"]}
        if not _tiles_group(args["BLOCK_K"], args["GROUP"]):
            continue
        # register budget: the factored path holds a (BLOCK_N, BLOCK_K) tile, the per-code path (BM, BN, BK)
        rows = 1 if _factored({**args, "SUB": _sub(args)}) else args["BLOCK_M"]
        if rows * GEMV_BLOCK_N * args["BLOCK_K"] <= 128 * 32 * c.num_warps:
            keep.append(c)
    return keep or [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=2)]


def _prune_gemm(configs, named_args, **kw):
    kw = {**named_args, **kw}
    m_cap = max(16, kw["M_KEY"])  # no tile taller than the (rounded) batch
    ok = [c for c in configs if _tiles_group(c.kwargs["BLOCK_K"], kw["GROUP"]) and c.kwargs["BLOCK_M"] <= m_cap]
    return ok or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)]


_GEMV_CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in (
    (64, 4, 4), (128, 4, 4), (256, 4, 3), (256, 4, 4), (256, 2, 4), (512, 4, 3), (512, 8, 3), (1024, 8, 2))]
_GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s in (  # chosen to compile without register spills on sm_90
    (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3), (128, 128, 64, 8, 3))]


def _autotuned(kernel, **kw):
    """Autotune on a GPU; under the interpreter the caller passes the blocks (timing a CPU emulation means
    nothing, and a few large tiles keep the CPU tests fast)."""
    return kernel if INTERPRET else triton.autotune(**kw)(kernel)


# ---------------------------------------------------------------------------------------------- kernels
@triton.heuristics({"SUB": _sub, "FACTORED": _factored})
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, KW, G, GW,
                 stride_xm, stride_w, stride_s, stride_z, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                 FACTORED: tl.constexpr):
    """out[m, n] (+)= sum_k x[m, k] * W[n, k] for M <= BLOCK_M <= 8; grid (cdiv(N, BLOCK_N), SPLIT_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_mask = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per_split + per_split, n_tiles)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    NSUB: tl.constexpr = BLOCK_K // SUB
    for t in range(pid_k * per_split, t_end):
        k0 = t * BLOCK_K
        if FACTORED:
            # per sub-tile: s * (sum_k x q - z * sum_k x), with sum_k x q summed plane by plane (module docstring)
            if BITS % 16 >= 8:
                p8 = _plane_words(w_ptr, rows, row_mask, stride_w, 0, k0, KW, 8, BLOCK_K, SUB)
            if BITS % 8 >= 4:
                LO4: tl.constexpr = BITS - BITS % 8
                p4 = _plane_words(w_ptr, rows, row_mask, stride_w, KW * LO4, k0, KW, 4, BLOCK_K, SUB)
            if BITS % 4 >= 2:
                LO2: tl.constexpr = BITS - BITS % 4
                p2 = _plane_words(w_ptr, rows, row_mask, stride_w, KW * LO2, k0, KW, 2, BLOCK_K, SUB)
            if BITS % 2 == 1:
                LO1: tl.constexpr = BITS - 1
                p1 = _plane_words(w_ptr, rows, row_mask, stride_w, KW * LO1, k0, KW, 1, BLOCK_K, SUB)
            s, z = _group_params(s_ptr, z_ptr, rows, row_mask, k0, G, GW, stride_s, stride_z, BITS, GROUP,
                                 HAS_ZEROS, NSUB, SUB)  # (BN, NSUB)
            for mi in tl.static_range(BLOCK_M):  # the weight tile is unpacked once for all activation rows
                x_row = x_ptr + mi * stride_xm
                k_lim = tl.where(mi < M, K, 0)  # padding rows beyond M read nothing
                # the widest plane (low bit 0) starts qx and gives the x sums; narrower ones add shifted
                if BITS % 16 >= 8:
                    qx, xs = _plane_dot(p8, x_row, k0, k_lim, 8, BLOCK_K, SUB)
                if BITS % 8 >= 4:
                    qx, xs = _plane_dot(p4, x_row, k0, k_lim, 4, BLOCK_K, SUB)
                if BITS % 4 >= 2:
                    if BITS < 4:
                        qx, xs = _plane_dot(p2, x_row, k0, k_lim, 2, BLOCK_K, SUB)
                    else:
                        qx += _plane_dot(p2, x_row, k0, k_lim, 2, BLOCK_K, SUB)[0] * (1 << LO2)
                if BITS % 2 == 1:
                    qx += _plane_dot(p1, x_row, k0, k_lim, 1, BLOCK_K, SUB)[0] * (1 << LO1)
                part = tl.sum(s * (qx - z * xs[None, :]), axis=1)  # (BN,)
                acc = tl.where(ms[:, None] == mi, acc + part[None, :], acc)
        else:  # sub-tiles narrower than a packed word (tiny groups): dequantize each code, then multiply
            codes = _load_codes(w_ptr, rows, row_mask, stride_w, k0, KW, BITS, BLOCK_N, BLOCK_K)
            w = _dequant(codes, s_ptr, z_ptr, rows, row_mask, k0, G, GW, stride_s, stride_z, BITS, GROUP,
                         HAS_ZEROS, BLOCK_N, BLOCK_K, SUB)  # (BN, BK) fp32
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & (ks < K)[None, :],
                        other=0.0).to(tl.float32)  # (BM, BK)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = out_ptr + ms[:, None] * stride_om + rows[None, :]
    mask = m_mask[:, None] & row_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)  # fp32 buffer, zeroed by the caller


@triton.heuristics({"SUB": _sub})
@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, KW, G, GW, M_KEY,
                 stride_xm, stride_w, stride_s, stride_z, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                 GROUP_M: tl.constexpr = 8):
    """out[m, n] = sum_k x[m, k] * W[n, k]; one program per [BLOCK_M, BLOCK_N] tile (M_KEY: autotune key only)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: programs that run together share weight tiles in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    row_mask = rows < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = t * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & (ks < K)[None, :],
                    other=0.0)  # (BM, BK) activation dtype
        codes = _load_codes(w_ptr, rows, row_mask, stride_w, k0, KW, BITS, BLOCK_N, BLOCK_K)
        w = _dequant(codes, s_ptr, z_ptr, rows, row_mask, k0, G, GW, stride_s, stride_z, BITS, GROUP, HAS_ZEROS,
                     BLOCK_N, BLOCK_K, SUB)
        wt = tl.trans(w.to(x_ptr.dtype.element_ty))  # (BK, BN), rounded to the activation dtype like x
        if DOT_FP32:  # the interpreter's tl.dot mishandles bf16: same rounded values, multiplied in fp32
            acc += tl.dot(x.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc)
    out = out_ptr + ms[:, None] * stride_om + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


_gemv = _autotuned(_gemv_kernel, configs=_GEMV_CONFIGS, reset_to_zero=["out_ptr"],
                   key=["N", "K", "BLOCK_M", "SPLIT_K", "BITS", "GROUP", "HAS_ZEROS"],
                   prune_configs_by={"early_config_prune": _prune_gemv})
_gemm = _autotuned(_gemm_kernel, configs=_GEMM_CONFIGS, key=["M_KEY", "N", "K", "BITS", "GROUP", "HAS_ZEROS"],
                   prune_configs_by={"early_config_prune": _prune_gemm})


# ---------------------------------------------------------------------------------------------- Python entry
def check_tileable(group_size: int) -> None:
    """Raise ValueError when the kernels cannot tile ``group_size`` (see the module docstring)."""
    if group_size == -1 or (group_size > 0 and (group_size & (group_size - 1) == 0 or group_size % 32 == 0)):
        return
    raise ValueError(f"group_size={group_size} cannot be tiled by the Triton kernels (needs a power of two or a "
                     f"multiple of 32): requantize with group_size 32/64/128 or use QuantLinear's torch path")


def unsupported_reason(packed: PackedWeight) -> str | None:
    """Why the kernels cannot run this packed weight (None when they can)."""
    if packed.bits not in PACK_BITS or packed.scales.dtype != torch.float16:
        return (f"packed weight with {packed.bits} bits and {packed.scales.dtype} scales: the kernels need bits in "
                f"{PACK_BITS} and float16 scales (build it with PackedWeight.from_quantized)")
    if not packed.natural_groups:
        return ("packed weight has irregular groups (act-order g_idx that is not a permutation of j // group_size): "
                "the kernels need contiguous groups, use QuantLinear's torch path")
    try:
        check_tileable(packed.group_size)
    except ValueError as e:
        return str(e)
    return None


def _check(x: torch.Tensor, packed: PackedWeight) -> None:
    """One-line errors for everything the kernels cannot do; never launch on inputs that would be wrong."""
    if not isinstance(x, torch.Tensor) or x.dtype not in ACT_DTYPES:
        raise ValueError(f"quant_matmul needs float16 or bfloat16 activations, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}: cast x with .half() or .bfloat16()")
    if x.dim() < 1 or x.shape[-1] != packed.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)} but the packed weight is (N, K) = {packed.shape}: "
                         f"the last dimension of x must be K={packed.in_features}")
    reason = unsupported_reason(packed)
    if reason:
        raise ValueError(reason)
    tensors = [t for t in (packed.qweight, packed.scales, packed.qzeros, packed.perm) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"x is on {x.device} but the packed weight on {packed.qweight.device}: "
                         f"move it with packed.to(x.device)")
    if x.device.type != "cuda" and INTERPRET and not _stdlib_interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so Triton's own library is not "
                           "interpreted: set it before anything imports triton (e.g. in the shell)")
    if x.device.type != "cuda" and not INTERPRET:
        hint = " (TRITON_INTERPRET=1 was set after this module was imported)" if os.environ.get(
            "TRITON_INTERPRET") == "1" else ""
        raise RuntimeError(f"the Triton kernels need a CUDA GPU and x is on {x.device}{hint}: run on a GPU, use "
                           f"QuantLinear (torch path on CPU), or set TRITON_INTERPRET=1 before importing "
                           f"ptqbench.kernels.triton_kernels (slow, for tests)")


def _stdlib_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.cdiv, InterpretedFunction)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: no split unless asked for


def _interp_block_k(group: int, k: int) -> int:
    """Interpreter tile width: the largest of 128/64/32 that tiles the group and is not much wider than K."""
    return next(bk for bk in (128, 64, 32) if _tiles_group(bk, group) and (bk == 32 or bk // 2 < k))


def choose_split_k(n: int, k: int, sms: int) -> int:
    """Split K only when the row blocks cannot fill the GPU (~2 programs per SM), keeping >= 512 columns a split."""
    blocks = triton.cdiv(n, GEMV_BLOCK_N)
    split = 1
    while blocks * split * 2 <= 2 * sms and split * 2 <= min(8, max(1, k // 512)):
        split *= 2
    return split


def quant_matmul(x: torch.Tensor, packed: PackedWeight, *, path: str = "auto", split_k: int | None = None
                 ) -> torch.Tensor:
    """``x @ dequant(W).T`` with the weight dequantized inside the kernel.

    x: (..., K) float16/bfloat16 on the weight's device; packed: (N, K) ``PackedWeight``; returns (..., N) in x's
    dtype. ``path``: "auto" (GEMV for <= 8 rows, else GEMM), "gemv" or "gemm". ``split_k``: GEMV K-splits
    (None: chosen from the shape and the GPU's SM count).
    """
    _check(x, packed)
    if path not in ("auto", "gemv", "gemm"):
        raise ValueError(f"path={path!r}: use 'auto', 'gemv' or 'gemm'")
    n, k = packed.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if packed.perm is not None:  # act-order: the packed columns are sorted by group, so permute x to match
        x2 = x2.index_select(1, packed.perm.long())
    x2 = x2.contiguous()
    m = x2.shape[0]
    if path == "auto":
        path = "gemv" if m <= GEMV_MAX_M else "gemm"
    if path == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the GEMV path takes at most {GEMV_MAX_M} rows, x has {m}: use path='gemm' or 'auto'")
    if split_k is not None and (path != "gemv" or split_k < 1):
        raise ValueError(f"split_k={split_k} applies to the GEMV path only and must be >= 1")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    group = 0 if packed.group_size == -1 else packed.group_size
    has_zeros = packed.qzeros is not None
    z = packed.qzeros if has_zeros else packed.qweight  # any valid pointer; never read when sym
    kw, gw = triton.cdiv(k, 32), triton.cdiv(packed.n_groups, 32)  # words per unit plane width (codes, zeros)
    common = (m, n, k, kw, packed.n_groups, gw)
    strides = (x2.stride(0), packed.qweight.stride(0), packed.scales.stride(0), z.stride(0))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if path == "gemv":
            split = split_k or choose_split_k(n, k, _num_sms(x.device))
            dst = out if split == 1 else torch.zeros(m, n, dtype=torch.float32, device=x.device)
            block_n = min(64, triton.next_power_of_2(n)) if INTERPRET else GEMV_BLOCK_N
            blocks = {"BLOCK_K": _interp_block_k(group, k)} if INTERPRET else {}
            _gemv[(triton.cdiv(n, block_n), split)](
                x2, packed.qweight, packed.scales, z, dst, *common, *strides, dst.stride(0),
                BITS=packed.bits, GROUP=group, HAS_ZEROS=has_zeros, SPLIT_K=split,
                BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, **blocks)
            if split > 1:
                out.copy_(dst)
        else:
            m_key = min(triton.next_power_of_2(m), 256)
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            blocks = {"BLOCK_M": min(64, max(16, m_key)), "BLOCK_N": min(64, max(16, triton.next_power_of_2(n))),
                      "BLOCK_K": _interp_block_k(group, k)} if INTERPRET else {}
            _gemm[grid](x2, packed.qweight, packed.scales, z, out, *common, m_key, *strides, out.stride(0),
                        BITS=packed.bits, GROUP=group, HAS_ZEROS=has_zeros,
                        DOT_FP32=INTERPRET and x.dtype == torch.bfloat16, **blocks)
    return out.reshape(*lead, n)
