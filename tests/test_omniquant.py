"""OmniQuant (LWC): the clipped grid, its gradients, lower block error than RTN, the FP-target protocol, end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.methods.range.lwc import LWCConfig, init_lwc, lwc_fake_quant, lwc_quantized_weight, train_lwc
from ptqbench.quantizer import build_config, get_method
from ptqbench.scheme import QuantScheme, rtn_quantize


def _heavy_tailed(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """Weights with outliers, where clipping the range pays off."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, in_f, generator=g).pow(-0.5) * 0.05


def test_no_clipping_limit_equals_rtn():
    w = _heavy_tailed(32, 128)
    gamma = torch.full((32, 2), 30.0)  # σ(30) = 1: no clipping
    fq = lwc_fake_quant(w, gamma, gamma.clone(), 3, 64, sym=False)
    assert torch.allclose(fq, rtn_quantize(w, 3, 64, sym=False).dequantize(), atol=1e-3)
    qw = lwc_quantized_weight(w, gamma, gamma.clone(), 3, 64, sym=False)
    assert torch.allclose(qw.dequantize(), fq, atol=1e-3)  # the stored format reproduces the fake-quant weight


def test_gradients_reach_the_clipping_factors():
    w = _heavy_tailed(16, 64)
    gamma, beta = init_lwc(w, 32)
    lwc_fake_quant(w, gamma, beta, 2, 32, sym=False).pow(2).sum().backward()
    assert gamma.grad is not None and beta.grad is not None
    assert gamma.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0


@pytest.mark.parametrize(("bits", "ratio"), [(2, 0.93), (3, 0.99)])  # measured: ≈0.88 and ≈0.94-0.97
def test_lwc_lowers_the_output_error_of_a_linear_vs_rtn(bits, ratio):
    torch.manual_seed(0)
    w = _heavy_tailed(64, 128)
    x = torch.randn(8, 64, 128)
    y = x @ w.T
    batches = [(x[i:i + 1], y[i:i + 1]) for i in range(8)]
    params, history = train_lwc(lambda qw, inp: inp @ qw["w"].T, {"w": w}, batches, bits, 64, False, epochs=5,
                                lr=5e-2)
    err = lambda q: float(((x @ q.T - y) ** 2).mean())  # noqa: E731
    lwc = lwc_quantized_weight(w, *params["w"], bits, 64, False).dequantize()
    assert err(lwc) < ratio * err(rtn_quantize(w, bits, 64, False).dequantize())
    assert history[-1] < history[0]
    assert (torch.sigmoid(params["w"][0]) < 0.98).any()  # it learned to clip


def test_lwc_lowers_a_block_output_error_vs_rtn():
    torch.manual_seed(1)
    block = nn.Sequential(nn.Linear(64, 96, bias=False), nn.GELU(), nn.Linear(96, 64, bias=False))
    with torch.no_grad():
        for lin in (block[0], block[2]):
            lin.weight.copy_(_heavy_tailed(*lin.weight.shape, seed=lin.in_features))
    x = torch.randn(6, 32, 64)
    with torch.no_grad():
        y = block(x)
    weights = {"0": block[0].weight.detach(), "2": block[2].weight.detach()}

    def forward(qw, inp):
        return torch.func.functional_call(block, {f"{n}.weight": w for n, w in qw.items()}, (inp,))

    params, _ = train_lwc(forward, weights, [(x[i:i + 1], y[i:i + 1]) for i in range(6)], 2, 32, False, epochs=4,
                          lr=5e-2)
    with torch.no_grad():
        lwc = forward({n: lwc_quantized_weight(w, *params[n], 2, 32, False).dequantize()
                       for n, w in weights.items()}, x)
        rtn = forward({n: rtn_quantize(w, 2, 32, False).dequantize() for n, w in weights.items()}, x)
    assert float((lwc - y).pow(2).mean()) < 0.95 * float((rtn - y).pow(2).mean())  # measured ≈0.88


def _truncated(smol, n_layers: int):
    base = smol.model.model
    full = base.layers
    try:
        base.layers = nn.ModuleList(full[:n_layers])
        model = copy.deepcopy(smol.model)
    finally:
        base.layers = full
    model.config.num_hidden_layers = n_layers
    return model


@pytest.mark.slow
def test_end_to_end_uses_fp_targets_and_beats_rtn(smol, monkeypatch):
    from ptqbench.data import CalibSpec, draw_calibration
    from ptqbench.methods.range import lwc as om

    model = _truncated(smol, 2)
    calib = draw_calibration(CalibSpec("docs", (("docs", 1.0),), 4, 64), 0, smol.tokenizer, "smol-test")
    ids = draw_calibration(CalibSpec("docs", (("docs", 1.0),), 2, 64), 1, smol.tokenizer, "smol-test").input_ids
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
        fp_layer1_in = model.model.layers[0](model.model.embed_tokens(calib.input_ids),
                                             position_embeddings=model.model.rotary_emb(
                                                 model.model.embed_tokens(calib.input_ids),
                                                 torch.arange(64)[None]))
    fp_layer1_in = fp_layer1_in[0] if isinstance(fp_layer1_in, tuple) else fp_layer1_in

    seen = []  # the targets layer 1 trains towards must come from the full-precision path
    real = om.train_lwc

    def spy(forward, weights, batches, *a, **k):
        seen.append(torch.cat([t for _, t in batches]))
        return real(forward, weights, batches, *a, **k)

    monkeypatch.setattr(om, "train_lwc", spy)
    scheme = QuantScheme(w_bits=2, group_size=64)
    q = copy.deepcopy(model)
    omniquant = get_method("omniquant")
    res = omniquant(scheme, build_config(omniquant, {"range": {"epochs": 2, "lr": 5e-2}})).quantize(q, calib)
    assert len(res.layers) == 14 and res.info["epochs"] == 2
    with torch.no_grad():
        fp_layer2_out = model.model.layers[1](fp_layer1_in, position_embeddings=model.model.rotary_emb(
            fp_layer1_in, torch.arange(64)[None]))
    fp_layer2_out = fp_layer2_out[0] if isinstance(fp_layer2_out, tuple) else fp_layer2_out
    assert torch.allclose(seen[1], fp_layer2_out, atol=1e-4)  # layer 1's target: FP layer 1 on FP inputs

    r = copy.deepcopy(model)
    get_method("rtn")(scheme).quantize(r, None)
    with torch.no_grad():
        err_omni = float((q.model(input_ids=ids).last_hidden_state - ref).norm() / ref.norm())
        err_rtn = float((r.model(input_ids=ids).last_hidden_state - ref).norm() / ref.norm())
    assert err_omni < err_rtn
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(q.get_submodule(name).weight.data, res.layers[name].dequantize())


def test_bad_inputs_raise_config_error():
    omniquant = get_method("omniquant")
    assert omniquant.recipe == "none+lwc+nearest"
    for epochs in (0, -1):
        with pytest.raises(ConfigError):
            LWCConfig(epochs=epochs)
        with pytest.raises(ConfigError):
            build_config(omniquant, {"range": {"epochs": epochs}})
    with pytest.raises(ConfigError):
        LWCConfig(lr=0.0)
    with pytest.raises(ConfigError, match="a_bits=8"):
        omniquant(QuantScheme(w_bits=4, group_size=64, a_bits=8))  # LWC only: weight-only
    with pytest.raises(ConfigError, match="lwc range fits"):  # learned clipping assumes nearest rounding
        get_method("lwc+gptq")
    with pytest.raises(ConfigError):
        QuantScheme(w_bits=1)
