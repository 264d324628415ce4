"""Quantization primitives on random tensors."""

import pytest
import torch

from ptqbench.errors import ConfigError
from ptqbench.quantizer import QuantResult
from ptqbench.scheme import QuantScheme, group_qparams, quantize_activation, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_codes_in_range_and_error_within_half_step(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    qw = rtn_quantize(w, bits, 64, sym)
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 2**bits - 1
    assert qw.scales.shape == (32, 2)
    err = (qw.dequantize() - w).abs()
    step = qw.scales.float()[:, qw.g_idx.long()]
    # round-to-nearest: at most half a step, plus the fp16 rounding of the stored scale times the code distance
    assert torch.all(err <= step * (0.5 + 2**bits * 2**-11) + 1e-6)
    assert err.mean() < step.mean() * 0.3
    if sym:
        assert torch.all(qw.zeros == 2 ** (bits - 1))


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [(rtn_quantize(w, b, 64, False).dequantize() - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-4


def test_partial_last_group():
    torch.manual_seed(0)
    w = torch.randn(8, 100)
    scales, zeros = group_qparams(w, 4, 64, False)
    assert scales.shape == (8, 2)  # 64 + 36 columns
    tail = w[:, 64:]
    expected = (tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / 15
    assert torch.allclose(scales[:, 1], expected, rtol=1e-6)


def test_group_that_does_not_divide_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="partial_group"):
        QuantScheme(w_bits=4, group_size=128).check_layer("model.layers.0.mlp.up_proj", 576)
    QuantScheme(w_bits=4, group_size=128, partial_group=True).check_layer("x", 576)
    QuantScheme(w_bits=4, group_size=64).check_layer("x", 576)


@pytest.mark.parametrize("kw", [dict(w_bits=1), dict(w_bits=9), dict(group_size=0), dict(a_bits=6),
                                dict(a_mode="per_channel")])
def test_bad_scheme(kw):
    with pytest.raises(ConfigError):
        QuantScheme(**kw)


def test_effective_bits_of_known_layer():
    # 4-bit, group 64, asymmetric: 4 bits per code + 16-bit scale / 64 + 4-bit zero / 64 = 4.3125
    qw = rtn_quantize(torch.randn(128, 576), 4, 64, False)
    assert QuantResult(layers={"l": qw}).effective_bits() == pytest.approx(4 + 16 / 64 + 4 / 64)
    qs = rtn_quantize(torch.randn(128, 576), 3, -1, True)  # per channel, symmetric: no zeros stored
    assert QuantResult(layers={"l": qs}).effective_bits() == pytest.approx(3 + 16 / 576)


def test_activation_quant_per_token_and_static():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64)
    x8 = quantize_activation(x, 8, "dynamic_per_token")
    x4 = quantize_activation(x, 4, "dynamic_per_token")
    e8, e4 = (x8 - x).abs().max(), (x4 - x).abs().max()
    assert 0 < e8 < e4
    assert e8 <= x.abs().amax() / 127 / 2 + 1e-6
    xs = quantize_activation(x, 8, "static_per_tensor", static_scale=torch.tensor(0.5))
    assert torch.allclose(xs, torch.clamp(torch.round(x / 0.5), -128, 127) * 0.5)
    assert torch.equal(quantize_activation(x, 16, "dynamic_per_token"), x)


def test_static_scales_are_input_absmax_with_and_without_lm_head():
    """Static per-tensor scales = absmax of each hooked linear's input / 127, whether the calibration pass runs the
    decoder alone (every hooked linear inside it) or the full model (the lm_head hooked too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptqbench.actquant import static_scales
    from ptqbench.models import linear_layers

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (5, 12))
    mods = linear_layers(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook((lambda n: lambda _m, a: seen.__setitem__(
        n, torch.maximum(seen.get(n, torch.tensor(0.0)), a[0].abs().amax())))(n)) for n, m in mods.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for names in (["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], ["model.layers.1.mlp.up_proj",
                                                                                      "lm_head"]):
        scales = static_scales(model, names, ids, 8, batch_size=2)
        for n in names:
            assert torch.allclose(scales[n], seen[n] / 127), n
