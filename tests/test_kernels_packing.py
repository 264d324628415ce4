"""Packed weight format and QuantLinear's torch path (no Triton needed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ptqbench.kernels.packing import PackedWeight, pack_codes, planes, unpack_codes
from ptqbench.kernels.quant_linear import QuantLinear, swap_to_quant_linear
from ptqbench.scheme import QuantizedWeight, rtn_quantize


def _same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.qweight, b.qweight) and a.qweight.dtype == b.qweight.dtype == torch.uint8
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.g_idx.long(), b.g_idx.long())
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


def _act_order(w: torch.Tensor, bits: int, group_size: int, seed: int = 0) -> QuantizedWeight:
    """A GPTQ act-order style weight: groups follow a random column permutation."""
    k = w.shape[1]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[perm] = torch.arange(k) // group_size
    base = rtn_quantize(w[:, perm], bits, group_size, sym=False)  # groups are contiguous in permuted order
    q = torch.empty_like(base.qweight)
    q[:, perm] = base.qweight
    return QuantizedWeight(q, base.scales, base.zeros, bits, group_size, g_idx.int(), False)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 32, 48, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_is_exact(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(7, 100)  # 100 columns: partial last group and a partial 32-code chunk
    qw = rtn_quantize(w, bits, group_size, sym)
    packed = PackedWeight.from_quantized(qw)
    _same(packed.unpack(), qw)
    assert torch.equal(packed.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_round_trip_extremes(bits):
    # all-max codes set the sign bit of the int32 words; widths that are not multiples of 32
    for n in (1, 31, 32, 33, 95):
        for codes in (torch.full((3, n), 2**bits - 1), torch.randint(0, 2**bits, (3, n)), torch.zeros(3, n)):
            words = pack_codes(codes.to(torch.uint8), bits)
            assert words.dtype == torch.int32 and words.shape == (3, math.ceil(n / 32) * bits)
            assert torch.equal(unpack_codes(words, bits, n), codes.to(torch.uint8))


def test_three_bit_is_dense_bit_planes():
    assert planes(3) == [(2, 0), (1, 2)] and planes(8) == [(8, 0)] and planes(7) == [(4, 0), (2, 4), (1, 6)]
    codes = torch.arange(32, dtype=torch.uint8)[None] % 8  # 32 codes -> exactly three words
    words = pack_codes(codes, 3)
    assert words.shape == (1, 3)
    lo = sum(int(c % 4) << (2 * i) for i, c in enumerate(codes[0, :16]))
    assert int(words[0, 0]) & 0xFFFFFFFF == lo  # word 0: low 2 bits of codes 0..15
    hi = sum(int(c // 4) << i for i, c in enumerate(codes[0]))
    assert int(words[0, 2]) & 0xFFFFFFFF == hi  # word 2: bit 2 of codes 0..31


@pytest.mark.parametrize("bits,group_size,sym", [(2, 128, False), (3, 64, False), (4, 128, True), (8, -1, False),
                                                 (3, 100, True)])
def test_nbytes_formula(bits, group_size, sym):
    n, k = 12, 300
    packed = PackedWeight.from_quantized(rtn_quantize(torch.randn(n, k), bits, group_size, sym))
    g = 1 if group_size == -1 else math.ceil(k / group_size)
    expect = 4 * n * math.ceil(k / 32) * bits + 2 * n * g + (0 if sym else 4 * n * math.ceil(g / 32) * bits)
    assert packed.nbytes == expect
    assert packed.qweight.shape == (n, math.ceil(k / 32) * bits)
    # within the 32-code padding of what the scheme's storage accounting says
    storage = rtn_quantize(torch.randn(n, k), bits, group_size, sym).storage_bits() / 8
    assert storage <= packed.nbytes <= storage + 4 * n * bits * 2


def test_act_order_round_trip():
    w = torch.randn(9, 130)
    qw = _act_order(w, 4, 32)
    packed = PackedWeight.from_quantized(qw)
    assert packed.perm is not None and packed.natural_groups  # sorted columns form regular groups
    _same(packed.unpack(), qw)
    assert torch.equal(packed.dequantize(), qw.dequantize())
    assert packed.nbytes == 4 * 9 * 5 * 4 + 2 * 9 * 5 + 4 * 9 * 1 * 4 + 4 * 130  # + the int32 permutation


def test_irregular_g_idx_round_trip():
    torch.manual_seed(0)
    w = torch.randn(5, 70)
    base = rtn_quantize(w, 3, 16, False)
    g_idx = torch.randint(0, base.scales.shape[1], (70,), dtype=torch.int32)  # groups of uneven sizes
    qw = QuantizedWeight(base.qweight, base.scales, base.zeros, 3, 16, g_idx, False)
    packed = PackedWeight.from_quantized(qw)
    assert not packed.natural_groups
    _same(packed.unpack(), qw)
    assert torch.equal(packed.dequantize(), qw.dequantize())


def test_pack_errors():
    qw = rtn_quantize(torch.randn(4, 64), 4, 32, True)
    with pytest.raises(ValueError, match="middle code"):
        PackedWeight.from_quantized(QuantizedWeight(qw.qweight, qw.scales, qw.zeros + 1, 4, 32, qw.g_idx, True))
    class Salient(QuantizedWeight):  # a format whose weight is not (q - zero) * scale
        def dequantize(self):
            return super().dequantize() * 2

    with pytest.raises(ValueError, match="uniform"):
        PackedWeight.from_quantized(Salient(qw.qweight, qw.scales, qw.zeros, 4, 32, qw.g_idx, True))
    with pytest.raises(ValueError, match="cannot be packed"):
        PackedWeight.from_quantized(QuantizedWeight(qw.qweight, qw.scales, qw.zeros, 1, 32, qw.g_idx, False))
    with pytest.raises(ValueError, match="cannot pack"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.full((2, 8), 16, dtype=torch.uint8), 4)


# ------------------------------------------------------------------------------------------------ QuantLinear
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, -1, True), (2, 48, False)])
def test_quant_linear_cpu_matches_dequant(bits, group_size, sym):
    torch.manual_seed(1)
    w, b = torch.randn(24, 100), torch.randn(24)
    qw = rtn_quantize(w, bits, group_size, sym)
    layer = QuantLinear(qw, b)
    x = torch.randn(2, 3, 100)
    y = layer(x)
    assert layer.last_backend == "torch" and y.shape == (2, 3, 24)
    assert torch.equal(y, nn.functional.linear(x, qw.dequantize(), b))
    torch.testing.assert_close(y, x @ qw.dequantize().T + b, rtol=1e-5, atol=1e-5)
    assert layer.nbytes == PackedWeight.from_quantized(qw).nbytes


def test_quant_linear_act_order_and_dtype_changes():
    qw = _act_order(torch.randn(16, 96), 4, 32, seed=3)
    layer = QuantLinear(qw)
    x = torch.randn(4, 96)
    assert torch.equal(layer.packed.dequantize(), qw.dequantize())
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)
    layer.to(torch.bfloat16).to(torch.float32)  # must not round the fp16 scales through bf16
    assert torch.equal(layer.packed.scales, qw.scales)
    y16 = layer(x.half())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), x @ qw.dequantize().T, rtol=2e-2, atol=2e-2)


def test_swap_to_quant_linear_matches_fake_quant():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 48, bias=False)))
    layers = {"0": rtn_quantize(model[0].weight.detach(), 4, 32, False),
              "2.0": rtn_quantize(model[2][0].weight.detach(), 3, 16, True)}
    fake = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 48, bias=False)))
    fake.load_state_dict(model.state_dict())
    with torch.no_grad():
        fake[0].weight.copy_(layers["0"].dequantize())
        fake[2][0].weight.copy_(layers["2.0"].dequantize())
    calls = []
    model[0].register_forward_pre_hook(lambda mod, args: calls.append(1))  # e.g. an activation quantizer
    x = torch.randn(5, 64)
    out = swap_to_quant_linear(model, layers)
    assert out is model and isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    assert torch.equal(model(x), fake(x)) and calls == [1]
    assert model[2][0].bias is None


def test_swap_errors():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    qw = rtn_quantize(torch.randn(4, 8), 4, 8, False)
    with pytest.raises(ValueError, match="no module"):
        swap_to_quant_linear(model, {"5": qw})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        swap_to_quant_linear(model, {"1": qw})
    with pytest.raises(ValueError, match="weight"):
        swap_to_quant_linear(model, {"0": rtn_quantize(torch.randn(4, 16), 4, 8, False)})
    assert isinstance(model[0], nn.Linear)  # nothing changed after an error
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(qw, backend="cuda")
