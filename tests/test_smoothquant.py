"""SmoothQuant: the smoothing factors and their folding on random tensors; end to end at W8A8 on a truncated model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.methods.range.minmax import MinMaxConfig
from ptqbench.methods.rounding.nearest import NearestConfig
from ptqbench.methods.transform.folding import fold_into_norm, scale_columns
from ptqbench.methods.transform.smoothquant import SmoothQuantConfig, smooth_scales
from ptqbench.quantizer import build_config, get_method
from ptqbench.scheme import QuantScheme, quantize_activation


def _block(seed: int = 0):
    """A norm feeding two linears (like input_layernorm → q/k/v) and inputs with a few outlier channels."""
    torch.manual_seed(seed)
    norm = nn.RMSNorm(64)
    nn.init.normal_(norm.weight, 1.0, 0.1)
    norm.weight.data[[5, 17, 40]] = 30.0  # the outlier channels come from the norm's gain, as in LLMs
    lins = [nn.Linear(64, 96, bias=False), nn.Linear(64, 32, bias=False)]
    x = torch.randn(2048, 64)
    return norm, lins, x


def test_folding_keeps_fp_output_and_flattens_activations() -> None:
    norm, lins, x = _block()
    with torch.no_grad():
        act = norm(x)
        ref = [lin(act) for lin in lins]
        act_max = act.abs().amax(0)
        s = smooth_scales(act_max, [lin.weight for lin in lins], 0.5)
        fold_into_norm(norm, s)
        scale_columns(lins, s)
        act2 = norm(x)
        for lin, r in zip(lins, ref):
            assert torch.allclose(lin(act2), r, atol=1e-5, rtol=1e-5)
    ratio = lambda a: float(a.abs().amax(0).max() / a.abs().amax(0).median())  # noqa: E731
    assert ratio(act2) < 0.5 * ratio(act)  # channel ranges much more even
    assert float(act2.abs().max()) < 0.5 * float(act.abs().max())


def test_smoothing_formula_and_alpha_extremes() -> None:
    act_max = torch.tensor([1.0, 4.0, 100.0])
    w = torch.tensor([[0.5, 0.1, 2.0], [-1.0, 0.2, 0.1]])
    s = smooth_scales(act_max, [w], 0.5)
    assert torch.allclose(s, (act_max.sqrt() / torch.tensor([1.0, 0.2, 2.0]).sqrt()))
    assert torch.allclose(smooth_scales(act_max, [w], 1.0), act_max)  # all the range moves to the weights
    assert torch.allclose(smooth_scales(act_max, [w], 0.0), 1 / torch.tensor([1.0, 0.2, 2.0]))
    # max|W_j| is over every linear reading the input
    assert torch.allclose(smooth_scales(act_max, [w[:1], w[1:]], 0.5), s)


def test_smoothing_reduces_w8a8_error_with_static_per_tensor_activations() -> None:
    norm, lins, x = _block(1)
    lin = lins[0]
    with torch.no_grad():
        act = norm(x)
        ref = lin(act)

        def w8a8_err(a: torch.Tensor, w: torch.Tensor) -> float:
            scale = a.abs().max() / 127
            aq = quantize_activation(a, 8, "static_per_tensor", True, scale)
            wscale = w.abs().amax(1, keepdim=True) / 127
            wq = torch.round(w / wscale).clamp(-128, 127) * wscale
            return float((aq @ wq.t() - ref).pow(2).mean())

        plain = w8a8_err(act, lin.weight)
        s = smooth_scales(act.abs().amax(0), [lin.weight], 0.5)
        smoothed = w8a8_err(act / s, lin.weight * s)
    assert smoothed < 0.5 * plain


def test_bad_inputs() -> None:
    sq = get_method("smoothquant")
    for bad in (-0.5, 1.01):
        with pytest.raises(ConfigError, match="alpha"):
            build_config(sq, {"transform": {"alpha": bad}})
    # the smoothing transform is bit-agnostic: any weight width is accepted (the range/rounding stages set it)
    assert sq(QuantScheme(w_bits=3, group_size=64)).scheme.w_bits == 3
    assert sq(QuantScheme(w_bits=2, group_size=-1, a_bits=8)).scheme.w_bits == 2
    # ... but a weight-only stage in the same recipe still refuses quantized activations
    with pytest.raises(ConfigError, match="lwc range stage does not support a_bits=8"):
        get_method("smoothquant+lwc")(QuantScheme(w_bits=8, group_size=-1, sym=True, a_bits=8))
    with pytest.raises(ConfigError, match="batch_size"):
        SmoothQuantConfig(batch_size=0)
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(sq, {"transform": {"batch_size": 0}})


def test_config_composes(compose) -> None:
    from ptqbench.run import resolve

    cell = resolve(compose(["method=smoothquant", "quant=w8a8"]))
    assert cell.method_cls is get_method("smoothquant") and cell.method_cls.recipe == "smoothquant+minmax+nearest"
    cfg = cell.method_cfg
    assert (cfg.transform, cfg.range, cfg.rounding) == (SmoothQuantConfig(), MinMaxConfig(), NearestConfig())
    assert cell.scheme.a_bits == 8 and cell.scheme.a_mode == "static_per_tensor" and cell.calib is not None
    w3 = resolve(compose(["method=smoothquant", "quant=w3g64"]))  # bit-agnostic transform: W3 composes
    assert w3.scheme.w_bits == 3 and w3.calib is not None
    with pytest.raises(ConfigError, match="alpha"):
        resolve(compose(["method=smoothquant", "quant=w8a8", "method.params.transform.alpha=2"]))


@pytest.mark.slow
def test_smoothquant_matches_or_beats_rtn_w8a8_on_truncated_model(truncated_smol) -> None:
    from conftest import last_hidden

    from ptqbench.actquant import attach_activation_quant
    model, calib, ids = truncated_smol(4)
    ref = last_hidden(model, ids)
    scheme = QuantScheme(w_bits=8, group_size=-1, sym=True, a_bits=8, a_mode="static_per_tensor")
    errs = {}
    for name, q in (("rtn", get_method("rtn")(scheme)), ("smoothquant", get_method("smoothquant")(scheme))):
        m = copy.deepcopy(model)
        res = q.quantize(m, calib)
        attach_activation_quant(m, list(res.layers), scheme, calib.input_ids)  # what run() does next
        errs[name] = float((last_hidden(m, ids) - ref).pow(2).mean())
        if name == "smoothquant":
            assert res.info["smoothed_groups"] == 4 * 2  # q/k/v and gate/up of each layer
            assert res.info["act_flattening"] > 1.0
    assert errs["smoothquant"] <= errs["rtn"], errs
