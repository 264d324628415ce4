"""DiscQuant (Chee et al., 2025, https://arxiv.org/abs/2501.06417): its tensor core on random matrices, the whole
optimization on a toy language model, its config and errors, and the GPTQ comparison on SmolLM2."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.methods.rounding.discquant import (DiscQuant, DiscQuantConfig, interpolation, kl_div, lr_factor,
                                                 neighbour_codes, window_order)
from ptqbench.quantizer import build_config, get_method
from ptqbench.scheme import QuantScheme, rtn_quantize
from ptqbench.stages import get_stage


class ToyLM(nn.Module):
    """Embedding → one residual MLP block → head: a language model small enough to distill in a second."""

    def __init__(self, vocab: int = 64, d: int = 64, h: int = 128, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            for p, s in ((self.emb.weight, 1.0), (self.up.weight, d**-0.5), (self.down.weight, h**-0.5),
                         (self.head.weight, 2 * d**-0.5)):
                p.copy_(torch.randn(p.shape, generator=g) * s)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        return self.head(x + self.down(torch.relu(self.up(x))))  # (b, T, vocab)


TARGETS = ["up", "down"]


def _calib(n: int = 8, seq: int = 32, vocab: int = 64, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(input_ids=torch.randint(0, vocab, (n, seq), generator=g), seed=seed)


def _discquant(scheme: QuantScheme, **cfg) -> tuple[DiscQuant, object]:
    return DiscQuant(scheme, DiscQuantConfig(**cfg)), get_stage("range", "minmax")(scheme)


def _kl_to(teacher: nn.Module, student: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher(ids).float(), -1).flatten(0, -2)
        return kl_div(t, student(ids).flatten(0, -2)).item()


# ------------------------------------------------------------------------------------------- tensor core
def test_neighbours_bracket_the_weight_on_random_matrices():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g)
    qw = rtn_quantize(w, 3, 64, False)
    gi = qw.g_idx.long()
    s, z = qw.scales.float()[:, gi], qw.zeros.float()[:, gi]
    down, up = neighbour_codes(w, s, z, 3)
    assert ((up - down) >= 0).all() and ((up - down) <= 1).all()
    lo, step = (down - z) * s, (up - down) * s
    y = interpolation(w, lo, step)
    assert ((y >= 0) & (y <= 1)).all()
    inner = step > 0  # both neighbours distinct: w is their interpolation
    assert torch.allclose((lo + y * step)[inner], w[inner], atol=1e-5)
    # coinciding neighbours: w on a grid point, or past an edge of the range by the fp16 rounding of the scale
    assert ((down[~inner] == 0) | (down[~inner] == 7) | ((lo[~inner] - w[~inner]).abs() < 1e-5)).all()
    rtn = qw.qweight.float()
    assert ((rtn == down) | (rtn == up)).all()  # RTN is one of the two corners


def test_schedule_and_window_order():
    assert [lr_factor(t, 4, 1.0) for t in range(4)] == [0.0, 0.25, 0.5, 0.75]  # the reference: warm-up throughout
    assert lr_factor(0, 4, 0.0) == 1.0 and lr_factor(3, 4, 0.0) < 0.2  # no warm-up: cosine decay
    order = window_order(5, 12, torch.Generator().manual_seed(0))
    assert len(order) == 12 and sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == window_order(5, 12, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ on a toy model
@pytest.mark.parametrize("init", ["orig", "rand"])
def test_codes_stay_on_the_fixed_grid_as_floor_or_ceil(init):
    model, calib = ToyLM(), _calib()
    scheme = QuantScheme(w_bits=3, group_size=32)
    stage, rng = _discquant(scheme, steps=6, batch=2, init=init)
    w = {n: getattr(model, n).weight.detach().clone() for n in TARGETS}
    out = stage.quantize_model(model, calib, rng, TARGETS)
    assert sorted(out) == sorted(TARGETS)
    for n, qw in out.items():
        ref = rtn_quantize(w[n], 3, 32, False)
        assert torch.equal(qw.scales, ref.scales) and torch.equal(qw.zeros, ref.zeros)
        assert torch.equal(qw.g_idx, ref.g_idx) and qw.bits == 3 and qw.group_size == 32
        gi = qw.g_idx.long()
        t = w[n] / qw.scales.float()[:, gi] + qw.zeros.float()[:, gi]
        q = qw.qweight.float()
        assert ((q == t.floor().clamp(0, 7)) | (q == t.ceil().clamp(0, 7))).all()  # never farther than a neighbour
        assert torch.equal(getattr(model, n).weight, qw.dequantize())  # written back on that grid
    assert not any(p.requires_grad is False for p in model.parameters())  # requires_grad restored
    assert 0 <= stage.info()["changed_vs_rtn"] < 1


def test_distillation_loss_below_rtn_on_toy_model():
    teacher, calib = ToyLM(), _calib(n=16)
    scheme = QuantScheme(w_bits=3, group_size=32)
    rtn = copy.deepcopy(teacher)
    for n in TARGETS:
        lin = getattr(rtn, n)
        lin.weight.data = rtn_quantize(lin.weight.data, 3, 32, False).dequantize()
    dq = copy.deepcopy(teacher)
    stage, rng = _discquant(scheme, steps=60, batch=4)
    stage.quantize_model(dq, calib, rng, TARGETS)
    ids = calib.input_ids
    kl_rtn, kl_dq = _kl_to(teacher, rtn, ids), _kl_to(teacher, dq, ids)
    assert kl_dq < 0.8 * kl_rtn, (kl_dq, kl_rtn)
    assert stage.info()["changed_vs_rtn"] > 0


def test_deterministic_given_the_seed():
    scheme = QuantScheme(w_bits=3, group_size=32)
    codes = []
    for seed in (0, 0, 1):
        model = ToyLM()
        stage, rng = _discquant(scheme, steps=4, batch=2, init="rand")
        out = stage.quantize_model(model, _calib(seed=seed), rng, TARGETS)
        codes.append(torch.cat([out[n].qweight.flatten() for n in TARGETS]))
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])


def test_inference_mode_is_refused():
    model, calib = ToyLM(), _calib()
    stage, rng = _discquant(QuantScheme(w_bits=3, group_size=32), steps=1, batch=1)
    with torch.inference_mode(), pytest.raises(ConfigError, match="outside torch.inference_mode"):
        stage.quantize_model(model, calib, rng, TARGETS)
    with torch.inference_mode():
        frozen = ToyLM()  # weights created under inference mode cannot take part in autograd
    with pytest.raises(ConfigError, match="inference tensors"):
        stage.quantize_model(frozen, calib, rng, TARGETS)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("bad,match", [
    (dict(preset="gpu"), "preset"), (dict(steps=0), "steps"), (dict(batch=0), "batch"), (dict(lr=0.0), "lr"),
    (dict(init="zeros"), "init"), (dict(rho=-1.0), "rho"), (dict(clamp=0.0), "clamp"), (dict(warmup=1.5), "warmup"),
    (dict(weight_decay=-0.1), "weight_decay")])
def test_bad_config_raises(bad, match):
    with pytest.raises(ConfigError, match=match):
        DiscQuantConfig(**bad)


def test_presets_and_recipes():
    paper = DiscQuantConfig(preset="paper").resolved_values()
    assert (paper["steps"], paper["batch"], paper["lr"], paper["init"]) == (128, 8, 0.05, "rand")
    cpu = DiscQuantConfig(steps=5).resolved_values()
    assert cpu["steps"] == 5 and cpu["init"] == "orig"  # an explicit field wins over the preset
    cls = get_method("discquant")
    assert cls.recipe == "none+minmax+discquant" and cls.family == "optimization" and cls.requires_calibration
    assert get_method("quarot+discquant").recipe == "quarot+minmax+discquant"
    with pytest.raises(ConfigError, match="whole model"):
        get_method("awq+discquant")  # AWQ's scales are fitted inside the layer loop
    cfg = build_config(cls, {"rounding": {"preset": "paper", "steps": 2}})
    assert cfg.rounding.resolved_values()["steps"] == 2 and cfg.rounding.resolved_values()["batch"] == 8


def test_hydra_resolves_presets(compose):
    from ptqbench.run import resolve

    cpu = resolve(compose(["method=discquant", "quant=w3g64"]))
    assert cpu.method_cfg.rounding.resolved_values()["steps"] == 64 and cpu.calib is not None
    paper = resolve(compose(["method=discquant", "quant=w3g64", "method.params.rounding.preset=paper"]))
    assert paper.method_cfg.rounding.resolved_values()["batch"] == 8 and paper.config_hash != cpu.config_hash
    mixed = resolve(compose(["method=none+minmax+discquant", "quant=w3g64", "method.params.rounding.preset=paper",
                             "method.params.rounding.steps=4"]))
    assert mixed.method_cfg.rounding.resolved_values() == {**paper.method_cfg.rounding.resolved_values(), "steps": 4}
    with pytest.raises(ConfigError, match="steps"):
        resolve(compose(["method=discquant", "quant=w3g64", "method.params.rounding.steps=0"]))


# ------------------------------------------------------------------------------------------- on SmolLM2
LAYERS, N_LAYERS = 2, 30
KEEP = ("lm_head", *(f"layers.{i}." for i in range(LAYERS, N_LAYERS)))  # quantize layers 0..LAYERS-1 only
SHORT_RUN = ("measured at this size (first 2 layers, 4 x 128 docs calibration, 3 x 256 docs windows): DiscQuant "
             "16.56 vs GPTQ 16.45 (RTN 17.73, FP 15.72); after 16 steps 9% of the interpolation variables are still "
             "fractional and are rounded to nearest at the end (the paper runs 128 steps of 8 x 2048 tokens). With "
             "32 steps on 4 x 256 tokens DiscQuant measured 16.45 vs GPTQ 16.65 on the same windows, too slow here")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=SHORT_RUN)
def test_discquant_perplexity_at_most_gptq_w3g64(smol):
    """The paper's claim (DiscQuant beats GPTQ on the same grid), W3 g64, sized for the test suite: the whole
    SmolLM2-135M with its first 2 decoder layers quantized (the rest kept in floating point), calibrated on 4 × 128
    docs tokens (DiscQuant: the CPU preset with 16 steps instead of 64), perplexity on 3 held-out 256-token windows."""
    from ptqbench import data
    from ptqbench.evaluators.perplexity import perplexity

    calib = data.draw_calibration(data.CalibSpec("docs", (("docs", 1.0),), 4, 128), 0, smol.tokenizer,
                                  smol.tokenizer_id)
    ev = data.eval_set("docs", 256, 3, smol.tokenizer, smol.tokenizer_id)
    scheme = QuantScheme(w_bits=3, group_size=64, keep_fp=KEEP)
    ppl = {}
    for name, params in (("gptq", {}), ("discquant", {"rounding": {"steps": 16}})):
        model = copy.deepcopy(smol.model)
        cls = get_method(name)
        res = cls(scheme, build_config(cls, params)).quantize(model, calib)
        assert len(res.layers) == 7 * LAYERS
        with torch.no_grad():
            ppl[name] = perplexity(model, ev)["value"]
        print(name, round(ppl[name], 3), res.info)  # shown with pytest -s
        del model
    assert ppl["discquant"] <= ppl["gptq"], ppl
