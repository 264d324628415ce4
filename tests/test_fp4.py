"""MXFP4 / NVFP4: the E2M1 grid, block scales, exact bits, packing, GPTQ on the FP4 grid, MR-GPTQ's micro-rotations,
and the refusals, on random tensors and a two-layer SmolLM2."""

from __future__ import annotations

import pytest
import torch

from ptqbench.errors import ConfigError
from ptqbench.fp4 import (E2M1, block_scales, e2m1_decode, e2m1_encode, e2m1_round, e4m3_round, fp4_fake_quant, fp4_quantize,
                          tensor_scale)
from ptqbench.kernels.fp4_packing import FP4Linear, PackedFP4Weight, pack_nibbles, unpack_nibbles
from ptqbench.methods.rounding.gptq import gptq_quantize
from ptqbench.methods.transform.microrotation import block_rotate, sylvester_hadamard
from ptqbench.quantizer import Quantizer, build_config, get_method
from ptqbench.recipe import recipe_class
from ptqbench.scheme import QuantScheme, quantize_activation

MX = dict(w_bits=4, group_size=32, sym=True, w_format="mxfp4")
NV = dict(w_bits=4, group_size=16, sym=True, w_format="nvfp4")


def _heavy(out: int = 64, inp: int = 256, seed: int = 0) -> torch.Tensor:
    """Weights with heavy-tailed rows and a few large columns (the outliers that FP4 blocks must absorb)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((out, inp)) * 0.02
    w[:, torch.randperm(inp, generator=g)[:4]] *= 8
    return w


def test_e2m1_grid_ties_to_even_and_saturates():
    grid = torch.tensor(E2M1)
    for v in (grid, -grid[1:]):
        assert torch.equal(e2m1_decode(e2m1_encode(v)), v)  # every grid value is its own code
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_decode(e2m1_encode(mids)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # even mantissa wins
    assert e2m1_round(torch.cat([mids, -mids])).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0,
                                                              -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert e2m1_decode(e2m1_encode(torch.tensor([7.0, -100.0, 0.3, -2.6]))).tolist() == [6.0, -6.0, 0.5, -3.0]
    assert int(e2m1_encode(torch.tensor([-0.5]))) == 8 | 1  # sign bit above the magnitude index
    y = torch.linspace(-8, 8, 64001)  # every tie and segment boundary on a 2.5e-4 lattice
    assert torch.equal(e2m1_round(y), e2m1_decode(e2m1_encode(y)))  # GPTQ's arithmetic rounding agrees


def test_block_scales_follow_each_format():
    w = _heavy()
    b = w.reshape(64, -1, 32)
    mx = block_scales(b, "mxfp4")
    assert torch.equal(torch.log2(mx), torch.log2(mx).round())  # E8M0: powers of two
    assert bool((b.abs() <= 6 * mx).all())  # min-max covers the block: nothing clipped
    assert bool((b.abs().amax(-1, keepdim=True) > 3 * mx).all())  # ... with the smallest such power of two
    ts = tensor_scale(w, "nvfp4")
    assert ts == pytest.approx(float(w.abs().max()) / (6 * 448))
    nv = block_scales(w.reshape(64, -1, 16), "nvfp4", tscale=ts)
    assert torch.equal(nv, e4m3_round(nv)) and float(nv.max()) <= 448  # stored scales are E4M3 values
    for fmt in ("mxfp4", "nvfp4"):  # the MSE search contains the min-max choice: never worse, here better
        e = {s: ((fp4_quantize(w, fmt, s).dequantize() - w) ** 2).sum().item() for s in ("minmax", "mse")}
        assert e["mse"] < e["minmax"], (fmt, e)


def test_exact_bits_and_packing_round_trip():
    w = _heavy()
    for fmt, bits in (("mxfp4", 4.25), ("nvfp4", 4.5 + 32 / w.numel())):
        q = fp4_quantize(w, fmt)
        assert q.storage_bits() / w.numel() == pytest.approx(bits, abs=1e-12)
        p = PackedFP4Weight.from_fp4(q)
        assert p.nbytes * 8 == q.storage_bits()
        u = p.unpack()
        assert torch.equal(u.qweight, q.qweight) and torch.equal(u.scales, q.scales) and u.tscale == q.tscale
        assert torch.equal(p.dequantize(), q.dequantize())
        x = torch.randn(5, w.shape[1])
        lin = FP4Linear(q, bias=torch.ones(w.shape[0]))
        assert torch.allclose(lin(x), x @ q.dequantize().T + 1, atol=1e-5) and lin.nbytes == p.nbytes
        with pytest.raises(ValueError, match="unsupported format"):
            FP4Linear(q, backend="triton")
    c = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(c)), c)


def test_fp4_activations_block_by_block():
    x = torch.randn(4, 7, 64) * torch.linspace(0.1, 10, 64)
    for fmt in ("mxfp4", "nvfp4"):
        y = quantize_activation(x, 4, "dynamic_per_token", fmt=fmt)
        assert y.shape == x.shape and not torch.equal(y, x)
        # the relative error per block stays at E2M1's resolution, whatever the spread across blocks
        rel = (y - x).abs().amax(-1) / x.abs().amax(-1)
        assert float(rel.max()) < 0.5
        assert torch.equal(y, fp4_fake_quant(x, fmt))
    assert float((quantize_activation(x, 4, "dynamic_per_token", fmt="nvfp4") - x).abs().mean()) < \
        float((quantize_activation(x, 4, "dynamic_per_token") - x).abs().mean())  # per-token INT4 loses the small


def test_gptq_on_the_fp4_grid_beats_nearest_and_keeps_blocks_contiguous():
    g = torch.Generator().manual_seed(1)
    w = _heavy(48, 128, seed=1)
    x = torch.randn(1024, 128, generator=g) @ (torch.randn(128, 128, generator=g) / 12 + torch.eye(128))
    h = 2 * x.T @ x / x.shape[0]
    for fmt, gs in (("mxfp4", 32), ("nvfp4", 16)):
        q = gptq_quantize(w, h, 4, gs, True, act_order=True, fmt=fmt)
        r = fp4_quantize(w, fmt)
        assert torch.equal(q.g_idx.long(), torch.arange(128) // gs)  # act-order, yet blocks in column order
        assert int(q.qweight.max()) <= 15
        out_err = {k: ((x @ (v.dequantize() - w).T) ** 2).mean().item() for k, v in (("gptq", q), ("rtn", r))}
        assert out_err["gptq"] < 0.85 * out_err["rtn"], (fmt, out_err)
        PackedFP4Weight.from_fp4(q)  # packable


def test_micro_rotation_is_orthogonal_and_block_local():
    h = sylvester_hadamard(32)
    assert torch.allclose(h @ h.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    x = torch.zeros(1, 64)
    x[0, 3] = 1.0  # an outlier in block 0 spreads over block 0 only
    y = block_rotate(x.double(), h)
    assert torch.allclose(y[0, :32].abs(), torch.full((32,), 32**-0.5, dtype=torch.float64))
    assert float(y[0, 32:].abs().max()) == 0.0


def test_scheme_and_recipe_refusals():
    with pytest.raises(ConfigError, match="mxfp4 fixes blocks of 32 elements: set quant.group_size=32"):
        QuantScheme(w_bits=4, group_size=64, w_format="mxfp4")
    with pytest.raises(ConfigError, match="set quant.group_size=16"):
        QuantScheme(w_bits=4, group_size=32, w_format="nvfp4")
    with pytest.raises(ConfigError, match="set quant.w_bits=4"):
        QuantScheme(w_bits=3, group_size=32, w_format="mxfp4")
    with pytest.raises(ConfigError, match="set quant.a_bits=4"):
        QuantScheme(a_bits=8, a_format="nvfp4")
    with pytest.raises(ConfigError, match="w_format='fp8'"):
        QuantScheme(w_format="fp8")
    mx = QuantScheme(**MX)
    for name, stage in (("awq", "awq transform"), ("clip+gptq", "clip range"), ("gptaq", "gptaq rounding"),
                        ("hqq", "hqq range")):
        with pytest.raises(ConfigError, match=f"the {stage} stage knows only the \\['int'\\] grids, not mxfp4"):
            recipe_class(name).check_scheme(mx)
    whole = type("IntOnly", (Quantizer,), {"name": "intonly", "family": "calibration-free", "quantize": None})
    with pytest.raises(ConfigError, match="method intonly knows only the \\['int'\\] grids, not nvfp4"):
        whole.check_scheme(QuantScheme(**NV))  # a whole method declares no FP4 support unless it says so
    with pytest.raises(ConfigError, match="mrgptq rounding stage knows only the \\['mxfp4', 'nvfp4'\\] grids, not int"):
        recipe_class("mrgptq").check_scheme(QuantScheme(w_bits=4, group_size=64))
    for ok in ("rtn", "gptq", "quarot+rtn", "mrgptq", "mr+rtn", "smoothquant"):
        recipe_class(ok).check_scheme(mx)


def test_mrgptq_runs_on_a_truncated_model(truncated_smol):
    """Micro-rotations keep the FP model's outputs; MR-GPTQ at MXFP4 W4A4 stays close to it and beats RTN."""
    from conftest import last_hidden

    from ptqbench.actquant import attach_activation_quant

    model, calib, ids = truncated_smol(2, n_calib=2, seq_len=128)
    ids = ids[:, :128]
    ref = last_hidden(model, ids)
    out = {}
    for recipe in ("mr+rtn", "mrgptq", "rtn"):
        import copy

        m = copy.deepcopy(model)
        sch = QuantScheme(w_bits=4, group_size=32, sym=True, w_format="mxfp4", a_bits=4, a_format="mxfp4")
        cls = get_method(recipe)
        if recipe == "mr+rtn":  # the rotation alone is function-preserving
            cls.stage_classes[0](sch).apply_model(m, calib)
            assert torch.allclose(last_hidden(m, ids), ref, rtol=1e-4, atol=1e-4)
            m = copy.deepcopy(model)
        res = cls(sch, build_config(cls, {})).quantize(m, calib)
        assert all(type(q).__name__ == "FP4Weight" for q in res.layers.values())
        assert res.effective_bits() == pytest.approx(4.25)
        attach_activation_quant(m, list(res.layers), sch)
        out[recipe] = ((last_hidden(m, ids) - ref) ** 2).mean().item()
    assert out["mrgptq"] < out["mr+rtn"] < out["rtn"], out


def test_fp4_labels_name_the_format_and_the_scale_search():
    assert QuantScheme(**MX).label == "mxfp4"
    assert QuantScheme(**NV, a_bits=4, a_format="nvfp4").label == "nvfp4a4"
    assert QuantScheme(**MX, scale_search="mse", name="mxfp4").label == "mxfp4_mse"  # quant=mxfp4 quant.scale_search=mse
    with pytest.raises(ConfigError, match="quant.scale_search=mse chooses FP4 block scales"):
        QuantScheme(w_bits=4, group_size=64, scale_search="mse")  # integer ranges belong to the range stage
