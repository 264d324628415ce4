"""Triton dequantize-matmul kernels against the torch dequantized reference, and the latency benchmark rows.

Without a CUDA GPU the kernels run in Triton's CPU interpreter on tiny shapes. ``triton.jit`` decides at decoration
time whether a function is interpreted, and that includes Triton's own library (``tl.cdiv``, the ``tl.sum``
combiner), so ``TRITON_INTERPRET=1`` must be set before anything imports triton. This module sets it at its top
when triton is not imported yet (pytest collects test modules in name order, and e.g. transformers' model code
imports triton). If triton was already imported, the kernel tests here skip and ``test_interpreter_in_subprocess``
reruns this file in a fresh interpreter with the variable set. The variable stays set for the rest of the pytest
process, which only matters to other Triton code (none runs on CPU). With a GPU the same tests run compiled on
CUDA, plus the ``gpu``-marked tests on larger shapes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from triton.language import standard as _tl_standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import ptqbench.kernels.triton_kernels as tk  # noqa: E402
from ptqbench.kernels.bench import METRICS, STANDARD_SHAPES, latency_rows, main  # noqa: E402
from ptqbench.kernels.packing import PackedWeight  # noqa: E402
from ptqbench.kernels.quant_linear import QuantLinear  # noqa: E402
from ptqbench.scheme import QuantizedWeight, rtn_quantize  # noqa: E402

RUN_HERE = HAS_CUDA or (tk.INTERPRET and isinstance(_tl_standard.cdiv, InterpretedFunction))
kernel_test = pytest.mark.skipif(not RUN_HERE, reason="triton was imported before TRITON_INTERPRET=1 could be "
                                 "set: covered by test_interpreter_in_subprocess")
DEV = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _case(n, k, bits, group_size, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = rtn_quantize(torch.randn(n, k, generator=g), bits, group_size, sym)
    return qw, PackedWeight.from_quantized(qw).to(DEV)


def _matches(y, x, qw, dtype) -> bool:
    """y has the reference's dtype and shape, and its max error relative to the output scale is within fp16 / bf16
    rounding (of w on the GEMM path, and of y). Prints the numbers when it is not (pytest shows them)."""
    ref = x.float() @ qw.dequantize().to(x.device).T
    if y.dtype != dtype or y.shape != ref.shape:
        print(f"got {y.dtype} {tuple(y.shape)}, expected {dtype} {tuple(ref.shape)}")
        return False
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    err, scale = (y.float() - ref).abs().max().item(), ref.abs().max().item()
    if err > tol * scale:
        print(f"max err {err:.3g} vs scale {scale:.3g} (tolerance {tol:g} of the scale)")
        return False
    return True


# bits -> group size for K=200: 7 groups of 32 (odd count), 4 of 64 and 2 of 128 (partial last group), per channel
GROUPS = {2: 32, 3: 64, 4: 128, 8: -1}


@kernel_test
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path,m", [("gemv", 1), ("gemv", 3), ("gemm", 20)])
def test_kernel_matches_reference(bits, sym, dtype, path, m):
    qw, packed = _case(24, 200, bits, GROUPS[bits], sym, seed=bits)
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m)).to(DEV, dtype)
    assert _matches(tk.quant_matmul(x, packed, path=path), x, qw, dtype)


@kernel_test
@pytest.mark.parametrize("group_size", [-1, 8, 16, 96, 160])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_group_sizes(group_size, path):
    # 8 and 16: sub-tiles narrower than a 3-bit word (GEMV dequantizes per code); 96: 3 groups, not a power of two
    qw, packed = _case(40, 230, 4 if group_size % 2 else 3, group_size, False, seed=group_size)
    x = torch.randn(4 if path == "gemv" else 17, 230).to(DEV, torch.float16)
    assert _matches(tk.quant_matmul(x, packed, path=path), x, qw, torch.float16)


@kernel_test
def test_split_k_and_auto_path():
    qw, packed = _case(20, 300, 4, 32, False)
    x = torch.randn(2, 300).to(DEV, torch.float16)
    assert _matches(tk.quant_matmul(x, packed, split_k=3), x, qw, torch.float16)  # 3 splits over uneven K tiles
    x3 = torch.randn(2, 5, 300).to(DEV, torch.bfloat16)  # 10 rows -> GEMM, leading dims kept
    y = tk.quant_matmul(x3, packed)
    assert y.shape == (2, 5, 20)
    assert _matches(y.reshape(10, 20), x3.reshape(10, 300), qw, torch.bfloat16)
    assert tk.quant_matmul(x[:0], packed).shape == (0, 20)


@kernel_test
def test_act_order_and_quant_linear_triton_backend():
    # GPTQ act-order: groups follow a random column permutation
    k, group_size = 96, 32
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    base = rtn_quantize(torch.randn(24, k), 4, group_size, sym=False)  # groups contiguous in permuted order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group_size).int()
    q = torch.empty_like(base.qweight)
    q[:, perm] = base.qweight
    qw = QuantizedWeight(q, base.scales, base.zeros, 4, group_size, g_idx, False)
    packed = PackedWeight.from_quantized(qw).to(DEV)
    assert packed.perm is not None
    for m in (1, 12):
        x = torch.randn(m, 96).to(DEV, torch.float16)
        assert _matches(tk.quant_matmul(x, packed), x, qw, torch.float16)
    bias = torch.randn(24)
    layer = QuantLinear(qw, bias, backend="triton").to(DEV)
    x = torch.randn(3, 96).to(DEV, torch.float16)
    torch.testing.assert_close(layer(x).float(), x.float() @ qw.dequantize().to(DEV).T + bias.to(DEV),
                               rtol=1e-2, atol=1e-2)
    assert layer.last_backend == "triton"


@kernel_test
def test_errors_are_one_line():
    qw, packed = _case(16, 64, 4, 32, False)
    x = torch.randn(2, 64).to(DEV, torch.float16)
    cases = [
        (ValueError, "float16 or bfloat16", lambda: tk.quant_matmul(x.float(), packed)),
        (ValueError, "last dimension", lambda: tk.quant_matmul(torch.randn(2, 65).to(DEV, torch.float16), packed)),
        (ValueError, "cannot be tiled", lambda: tk.quant_matmul(x, _case(16, 64, 4, 48, False)[1])),
        (ValueError, "at most 8 rows", lambda: tk.quant_matmul(torch.randn(9, 64).to(DEV).half(), packed,
                                                                path="gemv")),
        (ValueError, "path=", lambda: tk.quant_matmul(x, packed, path="fast")),
        (ValueError, "split_k", lambda: tk.quant_matmul(x, packed, path="gemm", split_k=2)),
    ]
    irregular = QuantizedWeight(qw.qweight, qw.scales, qw.zeros, 4, 32, torch.tensor([0] * 40 + [1] * 24).int())
    cases.append((ValueError, "irregular groups",
                  lambda: tk.quant_matmul(x, PackedWeight.from_quantized(irregular).to(DEV))))
    if HAS_CUDA:
        cases.append((ValueError, "move it", lambda: tk.quant_matmul(x, packed.to("cpu"))))
    for exc, match, call in cases:
        with pytest.raises(exc, match=match) as info:
            call()
        assert "\n" not in str(info.value)


@kernel_test
def test_no_gpu_without_interpreter_raises(monkeypatch):
    _, packed = _case(16, 64, 4, 32, False)
    monkeypatch.setattr(tk, "INTERPRET", False)  # as if TRITON_INTERPRET had not been set
    with pytest.raises(RuntimeError, match="need a CUDA GPU"):
        tk.quant_matmul(torch.randn(1, 64).half(), packed.to("cpu"))


def test_choose_split_k():
    assert tk.choose_split_k(11008, 4096, 132) == 1  # enough row blocks
    assert tk.choose_split_k(576, 1536, 132) == 2  # 36 blocks: split, but keep >= 512 columns per split
    assert tk.choose_split_k(256, 16384, 132) == 8


def test_latency_rows_without_gpu_are_skipped(tmp_path):
    if HAS_CUDA:
        pytest.skip("measures on a GPU (see test_latency_rows_gpu)")
    rows = latency_rows([(64, 128), (64, 128)], [3, 4], [1, 16])
    assert len(rows) == 1 * 2 * 2 * len(METRICS)  # duplicate shapes measured once
    assert {r["status"] for r in rows} == {"skipped"} and all(math.isnan(r["value"]) for r in rows)
    assert all("GPU" in r["error"] for r in rows)
    r = rows[0]
    assert (r["dataset"], r["group"], r["w_bits"], r["group_size"], r["unit"]) == ("64x128", "b1", 3, 128, "us")
    assert {r["metric"] for r in rows} == set(METRICS)
    out = tmp_path / "lat.csv"
    assert main(["--bits", "4", "--batch", "1", "--shapes", "standard", "--out", str(out)]) == 0
    assert out.read_text().count("skipped") == len(STANDARD_SHAPES) * len(METRICS)


@pytest.mark.skipif(RUN_HERE, reason="the kernel tests run in this process")
def test_interpreter_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ GPU only
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,dtype,sym,group_size", [  # each new shape key autotunes: keep the list short
    (4, 1, torch.float16, False, 128), (4, 16, torch.bfloat16, True, 128), (4, 64, torch.float16, False, -1),
    (3, 1, torch.bfloat16, False, 128), (3, 4, torch.float16, True, 64), (2, 1, torch.float16, False, 64),
    (2, 64, torch.bfloat16, False, 128), (8, 1, torch.float16, True, 128), (8, 16, torch.float16, False, 32),
])
def test_kernel_large_shapes_gpu(bits, m, dtype, sym, group_size):
    qw, packed = _case(1024, 4096 + 96, bits, group_size, sym, seed=m)  # partial last group
    x = torch.randn(m, 4096 + 96, device=DEV, dtype=dtype)
    assert _matches(tk.quant_matmul(x, packed), x, qw, dtype)
    if m == 1:  # the small-N split-K path too
        qw, packed = _case(256, 8192, bits, group_size, sym)
        x = torch.randn(1, 8192, device=DEV, dtype=dtype)
        assert tk.choose_split_k(256, 8192, torch.cuda.get_device_properties(0).multi_processor_count) > 1
        assert _matches(tk.quant_matmul(x, packed), x, qw, dtype)


@gpu
@pytest.mark.gpu
def test_latency_rows_gpu():
    rows = latency_rows([(512, 1024)], [4], [1], warmup=5, rep=10)
    assert {r["status"] for r in rows} == {"ok"}
    values = {r["metric"]: r["value"] for r in rows}
    assert values["latency_us"] > 0 and values["latency_fp16_us"] > 0 and 0 < values["roofline_frac"] < 2
    assert "driver" in rows[0]["device"]
