"""HQQ: the half-quadratic zero-point solver on random tensors; storage format; end to end on a truncated model."""

from __future__ import annotations

import copy

import pytest
import torch

from ptqbench.errors import ConfigError
from ptqbench.methods.range.hqq import HQQConfig, hqq_quantize, hqq_zero, shrink_lp
from ptqbench.quantizer import QuantResult, build_config, get_method
from ptqbench.scheme import QuantScheme, rtn_quantize


def _weights(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((256, 512)) * 0.02  # LLM-like heavy-tailed weights


def test_shrink_operator() -> None:
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    # p = 1: soft-thresholding at 1/β
    assert torch.allclose(shrink_lp(x, 10.0, 1.0), torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))
    # p < 1: threshold |x|^(p-1)/β, which shrinks large values less than small ones
    y = shrink_lp(x, 10.0, 0.7)
    assert y[2] == 0 and y[1] == 0 and y[3] == 0
    assert torch.allclose(y[4], torch.tensor(2.0 - 2.0 ** -0.3 / 10))
    assert torch.equal(y[0], -y[4])


@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_lowers_reconstruction_error_vs_rtn(bits: int) -> None:
    w = _weights(bits)
    rtn = rtn_quantize(w, bits, 64, False).dequantize()
    qw = hqq_quantize(w, bits, 64)
    hqq = qw.dequantize()
    l1 = lambda a: float((a - w).abs().mean())  # noqa: E731  (the solver's early-stop criterion)
    lp = lambda a: float((a - w).abs().pow(0.7).mean())  # noqa: E731  (the objective)
    assert l1(hqq) < 0.97 * l1(rtn)
    assert lp(hqq) < 0.97 * lp(rtn)
    assert 1 <= qw.meta["hqq_iters"] <= 20


def test_solver_improves_on_its_starting_point() -> None:
    w = _weights(7).reshape(-1, 64)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = (hi - lo) / 7
    zero0 = -lo / scale
    zero, iters = hqq_zero(w, scale, zero0, 3)
    err = lambda z: float((w - (torch.clamp(torch.round(w / scale + z), 0, 7) - z) * scale).abs().mean())  # noqa: E731
    assert err(zero) < 0.97 * err(zero0)
    assert not torch.equal(zero, zero0) and zero.shape == zero0.shape
    # without early stop every iteration runs
    assert hqq_zero(w, scale, zero0, 3, early_stop=False)[1] == 20


def test_storage_is_fp16_zeros_counted_honestly() -> None:
    w = _weights(1)
    qw = hqq_quantize(w, 3, 64)
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 7
    assert qw.zeros.dtype == torch.float16 and qw.scales.dtype == torch.float16
    assert qw.meta["zero_dtype"] == "fp16" and qw.meta["packed_kernels"] is False
    from ptqbench.kernels.packing import PackedWeight

    with pytest.raises(ValueError, match="cannot be packed"):  # integer-zero kernels would truncate the zeros
        PackedWeight.from_quantized(qw)
    assert (qw.zeros.float() != qw.zeros.float().round()).any()  # zeros are really fractional
    out, inp = w.shape
    ng = inp // 64
    assert qw.storage_bits() == out * inp * 3 + out * ng * 16 + out * ng * 16  # codes + fp16 scale + fp16 zero
    assert QuantResult(layers={"x": qw}).effective_bits() == pytest.approx(3 + 32 / 64)
    # codes are the nearest ones for the stored fp16 parameters
    s, z = qw.scales.float().repeat_interleave(64, 1), qw.zeros.float().repeat_interleave(64, 1)
    assert torch.equal(qw.qweight.float(), torch.clamp(torch.round(w / s + z), 0, 7))


def test_bad_inputs() -> None:
    hqq = get_method("hqq")
    assert hqq.recipe == "none+hqq+nearest"
    with pytest.raises(ConfigError, match="a_bits"):
        hqq(QuantScheme(w_bits=4, group_size=64, a_bits=8))
    with pytest.raises(ConfigError, match="asymmetric scheme: set quant.sym=false"):
        hqq(QuantScheme(w_bits=4, group_size=64, sym=True))
    with pytest.raises(ConfigError, match="lp_norm"):
        build_config(hqq, {"range": {"lp_norm": 1.5}})
    with pytest.raises(ConfigError, match="kappa"):
        HQQConfig(kappa=1.0)
    with pytest.raises(ConfigError, match="iters"):
        HQQConfig(iters=0)
    with pytest.raises(ConfigError, match="use none[+]hqq[+]nearest"):  # GPTQ would rewrite the fitted weight
        get_method("none+hqq+gptq")
    assert hqq.requires_calibration is False


@pytest.fixture(scope="module")
def truncated(truncated_smol):
    model, _, ids = truncated_smol(4)  # HQQ is calibration-free: the calibration set is not used
    return model, ids


@pytest.mark.slow
def test_hqq_lowers_weight_error_of_every_real_linear(truncated) -> None:
    """The paper's objective on the embedded model's weights: lower error than RTN at W3 g64, linear by linear."""
    from ptqbench.models import linear_layers

    model, _ = truncated
    for name, lin in linear_layers(model.model).items():
        w = lin.weight.data
        rtn, hqq = rtn_quantize(w, 3, 64, False).dequantize(), hqq_quantize(w, 3, 64).dequantize()
        assert float((hqq - w).abs().mean()) < float((rtn - w).abs().mean()), name
        assert float((hqq - w).pow(2).mean()) < 0.95 * float((rtn - w).pow(2).mean()), name


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured, not tuned: on SmolLM2 HQQ's fractional zero puts 0.0 between grid points, and the input channels "
    "with massive activations (E[x²] ~1e4 at down_proj of layer 11) have near-zero weights that RTN's integer zero "
    "represents almost exactly; the full embedded eval at W3 g64 is worse than RTN too (see methods/README.md)"))
def test_hqq_beats_rtn_output_error_on_truncated_model(truncated) -> None:
    from conftest import last_hidden

    model, ids = truncated
    ref = last_hidden(model, ids)
    errs = {}
    scheme = QuantScheme(w_bits=3, group_size=64)
    for name, q in (("rtn", get_method("rtn")(scheme)), ("hqq", get_method("hqq")(scheme))):
        m = copy.deepcopy(model)
        res = q.quantize(m, None)  # calibration-free
        assert len(res.layers) == 4 * 7
        errs[name] = float((last_hidden(m, ids) - ref).pow(2).mean())
    assert errs["hqq"] < errs["rtn"], errs


def test_fast_update_equals_the_paper_formula() -> None:
    """The in-place zero update equals the reference's ``mean(q - (w - shrink(w - W_r))/s)`` step by step."""
    w = _weights(3).reshape(-1, 64)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = (hi - lo) / 15
    zero, beta = -lo / scale, 10.0
    for it in range(1, 4):
        q = torch.clamp(torch.round(w / scale + zero), 0, 15)
        w_e = shrink_lp(w - (q - zero) * scale, beta, 0.7)
        zero = torch.mean(q - (w - w_e) / scale, dim=1, keepdim=True)
        beta *= 1.01
        got, _ = hqq_zero(w, scale, -lo / scale, 4, iters=it, early_stop=False)
        assert torch.allclose(got, zero, atol=1e-4)
