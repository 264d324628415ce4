"""QuaRot: orthogonal/Hadamard matrices, computational invariance of the rotations, quantization end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from ptqbench.errors import ConfigError
from ptqbench.methods.transform.quarot import QuaRotConfig, hadamard, random_orthogonal, rotate_model, rotation
from ptqbench.quantizer import build_config, get_method
from ptqbench.scheme import QuantScheme


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _truncated(smol, n_layers: int):
    """A deep copy of the embedded model keeping its first ``n_layers`` decoder layers (copies only those)."""
    base = smol.model.model
    full = base.layers
    try:
        base.layers = torch.nn.ModuleList(full[:n_layers])
        model = copy.deepcopy(smol.model)
    finally:
        base.layers = full
    model.config.num_hidden_layers = n_layers
    return model


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 64, 192, 576, 1536])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert h is not None
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # ±1/√n: a Hadamard, not any orthogonal matrix


@pytest.mark.parametrize("n", [3, 6, 9, 18])
def test_no_hadamard_falls_back_to_a_seeded_random_orthogonal(n):
    assert hadamard(n) is None  # orders other than 1, 2 and multiples of 4 cannot have one
    r = rotation(n, torch.Generator().manual_seed(0), randomize=True)
    assert not r.is_hadamard
    m = r.matrix()
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=m.dtype), atol=1e-12)
    assert torch.equal(m, rotation(n, torch.Generator().manual_seed(0), randomize=True).matrix())
    q = random_orthogonal(n, torch.Generator().manual_seed(1))
    assert torch.allclose(q.T @ q, torch.eye(n, dtype=q.dtype), atol=1e-12)


def test_factored_rotation_matches_its_dense_matrix():
    r = rotation(576, torch.Generator().manual_seed(3), randomize=True)
    m = r.matrix()
    assert r.is_hadamard and r.signs is not None
    assert torch.allclose(m @ m.T, torch.eye(576, dtype=m.dtype), atol=1e-12)
    x = torch.randn(7, 576, dtype=torch.float64)
    assert torch.allclose(r.right(x), x @ m, atol=1e-12)


def _tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=90, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm scales, so folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def test_rotation_keeps_tiny_llama_outputs():
    model = _tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    rot = copy.deepcopy(model)
    info = rotate_model(rot, seed=0)
    with torch.no_grad():
        out = rot(input_ids=ids).logits
    assert _rel(out, ref) < 1e-4
    assert info["rotation_is_hadamard"] == 1 and info["untied_lm_head"] == 1
    assert info["online_down_is_hadamard"] == 0  # 90 is no multiple of 4: random orthogonal, still exact
    assert rot.lm_head.weight is not rot.model.embed_tokens.weight
    # the weights really changed (a no-op would also pass the invariance check)
    assert _rel(rot.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight) > 0.5
    assert torch.allclose(rot.model.layers[0].input_layernorm.weight, torch.ones(64))


@pytest.mark.slow
def test_rotation_keeps_smollm2_outputs(smol):
    model = _truncated(smol, 3)
    ids = torch.randint(0, 49152, (1, 48))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    info = rotate_model(model, seed=1)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert _rel(out, ref) < 1e-4
    assert info["rotation_is_hadamard"] == info["online_down_is_hadamard"] == info["online_o_is_hadamard"] == 1
    assert smol.model.lm_head.weight is smol.model.model.embed_tokens.weight  # the shared fixture is untouched


def _activation_error(model, ids, scheme, quantizer_cls, cfg=None):
    """Relative logit error of a quantized W4A4 copy against the fp model (activation hooks as the run loop adds)."""
    from ptqbench.actquant import attach_activation_quant
    from ptqbench.pipeline import target_linears

    with torch.no_grad():
        ref = model(input_ids=ids).logits
    q = copy.deepcopy(model)
    res = quantizer_cls(scheme, cfg).quantize(q, None)
    names, _ = target_linears(q, scheme)
    attach_activation_quant(q, [n for n in names if n in res.layers], scheme)
    with torch.no_grad():
        return _rel(q(input_ids=ids).logits, ref), res


@pytest.mark.slow
def test_quarot_w4a4_beats_rtn_on_truncated_smollm2(smol):
    model = _truncated(smol, 4)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(w_bits=4, group_size=-1, a_bits=4)
    err_rtn, _ = _activation_error(model, ids, scheme, get_method("rtn"))
    err_quarot, res = _activation_error(model, ids, scheme, get_method("quarot+rtn"))  # QuaRot-RTN
    assert err_quarot < 0.7 * err_rtn, (err_quarot, err_rtn)
    assert len(res.layers) == 4 * 7 and res.info["rotation_is_hadamard"] == 1


@pytest.mark.slow
def test_quarot_gptq_end_to_end_on_truncated_smollm2(smol):
    from ptqbench.data import CalibSpec, draw_calibration

    model = _truncated(smol, 2)
    calib = draw_calibration(CalibSpec("docs", (("docs", 1.0),), 4, 64), 0, smol.tokenizer, "smol-test")
    scheme = QuantScheme(w_bits=4, group_size=-1, a_bits=4)  # W4A4: GPTQ inside QuaRot with quantized activations
    quarot = get_method("quarot")
    assert quarot.recipe == "quarot+minmax+gptq"  # the alias is QuaRot with GPTQ rounding (the paper's main setting)
    res = quarot(scheme).quantize(model, calib)
    assert res.info["rotation_is_hadamard"] == 1 and len(res.layers) == 2 * 7
    lin = model.model.layers[1].mlp.down_proj
    assert torch.equal(lin.weight.data, res.layers["model.layers.1.mlp.down_proj"].dequantize())


def test_bad_inputs_raise_config_error():
    with pytest.raises(ConfigError):  # two transforms: awq cannot be QuaRot's weight quantizer
        get_method("quarot+awq")
    with pytest.raises(ConfigError, match="no parameter"):  # GPTQ's settings are the rounding stage's now
        build_config(get_method("quarot"), {"transform": {"inner": "rtn"}})
    assert build_config(get_method("quarot"), {"transform": {"seed": 3}}).transform == QuaRotConfig(seed=3)
    for name in ("quarot", "quarot+rtn"):
        for a in (4, 8, 16):  # QuaRot's settings are accepted
            get_method(name).check_scheme(QuantScheme(w_bits=4, group_size=-1, a_bits=a))
    with pytest.raises(ConfigError):
        QuantScheme(w_bits=4, a_bits=6)  # unsupported activation bits
    with pytest.raises(ConfigError):
        QuantScheme(w_bits=1)  # unsupported weight bits
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="architecture|GPT2|support"):  # rotations need a Llama-style model
        get_method("quarot+rtn")(QuantScheme(w_bits=4, group_size=32)).quantize(gpt2, None)
    with pytest.raises(ValueError, match="calibration"):  # the alias's GPTQ rounding needs calibration data
        get_method("quarot")(QuantScheme(w_bits=4, group_size=32)).quantize(gpt2, None)
