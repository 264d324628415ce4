"""GWQ (Shao et al., 2024, https://arxiv.org/abs/2411.00850): exact outlier budget, exact fp16 outliers, honest
storage, gradient and SpQR-style salience, the dense-plus-sparse packed path, and the claims on SmolLM2."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import CLAIM_KEEP, DOMAINS
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.kernels.packing import PackedWeight
from ptqbench.kernels.quant_linear import QuantLinear, swap_to_quant_linear
from ptqbench.methods.rounding.gptq import gptq_quantize
from ptqbench.methods.rounding.gwq import (GWQ, GWQConfig, SparseOutlierLinear, SparseOutlierWeight,
                                           hessian_salience, loss_gradients, top_fraction)
from ptqbench.quantizer import build_config, get_method
from ptqbench.scheme import QuantScheme


def _problem(out_f=96, in_f=256, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) * (0.2 + 3 * torch.rand(in_f, generator=g))  # uneven input scales
    return w, 2 * x.T @ x / n


def _gwq(w, h, fraction, bits=3, gs=64, act_order=True):
    mask = top_fraction(hessian_salience(w, h, bits, gs, False, 0.01, act_order), fraction)
    return SparseOutlierWeight.from_kept(gptq_quantize(w, h, bits, gs, act_order=act_order, keep=mask), mask), mask


@pytest.mark.parametrize("fraction", [0.01, 0.05])
@pytest.mark.parametrize("act_order", [False, True])
def test_exact_budget_exact_outliers_and_the_rest_on_the_grid(fraction, act_order):
    w, h = _problem()
    qw, mask = _gwq(w, h, fraction, act_order=act_order)
    assert int(mask.sum()) == round(fraction * w.numel()) == qw.col_idx.numel() == qw.meta["outliers"]
    kept = gptq_quantize(w, h, 3, 64, act_order=act_order, keep=mask).meta["kept_values"]  # compensated, fp32
    deq = qw.dequantize()
    assert torch.equal(deq[mask], kept.half().float())  # exactly their fp16 values, in mask.nonzero() order
    s, z = qw.scales.float()[:, qw.g_idx.long()], qw.zeros.float()[:, qw.g_idx.long()]  # (out, in)
    level = deq / s + z  # grid level of every weight
    rest = level[~mask]
    assert torch.allclose(rest, rest.round(), atol=1e-3) and rest.min() >= 0 and rest.max() <= 7
    dense = qw.dense().dequantize()
    assert torch.equal(dense[mask], torch.zeros(int(mask.sum()))) and torch.equal(dense[~mask], deq[~mask])


def test_kept_weight_leaves_its_group_range_and_spqr_score_finds_it():
    w, h = _problem()
    w[5, 70] = 40.0  # a planted outlier in group 1 of row 5
    score = hessian_salience(w, h, 3, 64, act_order=False)
    assert int(score.flatten().argmax()) == 5 * 256 + 70  # leave-one-out: dropping it shrinks its whole group
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[5, 70] = True
    qw = SparseOutlierWeight.from_kept(gptq_quantize(w, torch.eye(256), 3, 64, keep=mask), mask)
    plain = gptq_quantize(w, torch.eye(256), 3, 64)
    assert float(qw.scales[5, 1]) < 0.2 * float(plain.scales[5, 1])  # the range no longer spans 40
    assert float(qw.dequantize()[5, 70]) == 40.0


def test_zero_outliers_is_gptq_and_storage_is_counted_by_hand():
    w, h = _problem(out_f=64, in_f=128)
    none, _ = _gwq(w, h, 0.0)
    plain = gptq_quantize(w, h, 3, 64, act_order=True)
    assert torch.equal(none.dequantize(), plain.dequantize())
    qw, _ = _gwq(w, h, 0.01)
    k = round(0.01 * 64 * 128)  # 82 outliers
    codes, scales, zeros = 64 * 128 * 3, 64 * 2 * 16, 64 * 2 * 3  # 3-bit codes, fp16 scales, 3-bit zeros, 2 groups
    csr = k * 16 + k * 16 + (64 + 1) * 32  # fp16 values, 16-bit column indices, 32-bit row pointers
    assert qw.storage_bits() == codes + scales + zeros + csr
    assert none.storage_bits() == codes + scales + zeros + 65 * 32


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, h, **_):
        return h + self.down(torch.relu(self.up(h)))


class _ToyLM(nn.Module):
    """An HF-shaped causal LM: ``model.layers``, ``forward(input_ids, use_cache) -> .logits``."""

    def __init__(self, vocab=32, d=64):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.embed = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList([_Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, use_cache=False, **_):
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.lm_head(h))


def _planted():
    """A toy LM whose ``up`` weight (7, 3) sees a large input (embedding column 3) and drives a unit the loss
    reads strongly (``down`` column 7): its loss gradient is the largest of the matrix."""
    model = _ToyLM()
    blk = model.model.layers[0]
    with torch.no_grad():
        model.model.embed.weight[:, 3] = 30.0
        blk.up.weight[7, 3] = 0.5  # unit 7 always active
        blk.down.weight[:, 7] *= 30.0
    calib = SimpleNamespace(input_ids=torch.randint(0, 32, (4, 32), generator=torch.Generator().manual_seed(1)))
    return model, calib


def test_gradient_salience_picks_the_planted_weight_and_restores_the_model():
    model, calib = _planted()
    stage = GWQ(QuantScheme(w_bits=3, group_size=32), GWQConfig(outlier_fraction=1e-4))  # k = 1 per linear
    stage.prepare_model(model, calib)
    assert stage.outliers["model.layers.0.up"].tolist() == [7 * 64 + 3]
    assert set(stage.outliers) == {"model.layers.0.up", "model.layers.0.down"}  # lm_head is kept in fp
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    g = loss_gradients(model, calib.input_ids[:1], ["model.layers.0.up"])["model.layers.0.up"]
    assert g.shape == (128, 64) and int(g.abs().flatten().argmax()) == 7 * 64 + 3


def test_end_to_end_on_a_toy_model_and_the_refusals():
    model, calib = _planted()
    cls = get_method("gwq")
    assert cls.recipe == "none+minmax+gwq" and cls.family == "salience/scaling"
    res = cls(QuantScheme(w_bits=3, group_size=32)).quantize(model, calib)
    qw = res.layers["model.layers.0.up"]
    assert isinstance(qw, SparseOutlierWeight) and torch.equal(model.model.layers[0].up.weight, qw.dequantize())
    assert res.info["gwq_outliers"] == round(0.01 * 128 * 64) + round(0.01 * 64 * 128)
    with pytest.raises(ConfigError, match="inference mode"), torch.inference_mode():
        GWQ(QuantScheme(w_bits=3, group_size=32)).prepare_model(*_planted())
    stage = GWQ(QuantScheme(w_bits=3, group_size=32))
    model, calib = _planted()
    stage.prepare_model(model, calib)
    with pytest.raises(ConfigError, match="layer-level transform"):  # e.g. awq rescaled the columns since
        stage._gradient_mask("model.layers.0.up", model.model.layers[0].up.weight * 2)
    # the recipe refuses the layer-level transform before any work, when its config is built (python -m ptqbench:
    # in resolve, before the model loads); with the Hessian salience it runs
    with pytest.raises(ConfigError, match="awq transform rescales the weights.*salience=hessian"):
        build_config(get_method("awq+gwq"), {})
    assert build_config(get_method("awq+gwq"), {"rounding": {"salience": "hessian"}}).rounding.salience == "hessian"


def test_hydra_names_the_recipe_and_its_parameters(compose):
    from ptqbench.run import resolve

    cell = resolve(compose(["method=gwq", "method.params.rounding.salience=hessian", "quant=w3g64"]))
    assert cell.method_cls.recipe == "none+minmax+gwq" and cell.method_cfg.rounding.salience == "hessian"


@pytest.mark.parametrize("params", [{"salience": "fisher"}, {"outlier_fraction": 1.0}, {"outlier_fraction": -0.1},
                                    {"grad_samples": 0}, {"percdamp": 0.0}, {"blocksize": 0}])
def test_bad_config_raises(params):
    with pytest.raises(ConfigError):
        build_config(get_method("gwq"), {"rounding": params})


def test_packed_path_is_dense_plus_sparse_and_matches_fake_quant():
    w, h = _problem(out_f=48, in_f=128)
    qw, _ = _gwq(w, h, 0.05)
    with pytest.raises(ValueError, match="cannot be packed"):  # the uniform packer refuses the outliers...
        PackedWeight.from_quantized(qw)
    plain = gptq_quantize(torch.randn(16, 48), torch.eye(48), 4, 16)
    model = nn.Sequential(nn.Linear(128, 48), nn.Linear(48, 16, bias=False))
    fake = copy.deepcopy(model)
    with torch.no_grad():
        fake[0].weight.copy_(qw.dequantize())
        fake[1].weight.copy_(plain.dequantize())
    swap_to_quant_linear(model, {"0": qw, "1": plain})  # ...and the swap builds the dense-plus-sparse module instead
    assert isinstance(model[0], SparseOutlierLinear) and isinstance(model[0].dense, QuantLinear)
    assert isinstance(model[1], QuantLinear)  # the uniform format keeps its path
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(model(x), fake(x), rtol=1e-5, atol=1e-5)
    assert model[0].nbytes >= qw.storage_bits() / 8  # packed: codes padded to 32 columns, + act-order perm


# ------------------------------------------------------------------------------------------------ SmolLM2 claims
# The shared claim setting (tests/conftest.py ``claim_grid``): the whole SmolLM2 with its first 4 decoder layers
# quantized, 8 x 256 docs calibration (GWQ's gradient: the first window), 3 held-out 256-token windows per domain.
W3 = dict(w_bits=3, group_size=64, keep_fp=CLAIM_KEEP)
HESSIAN = {"rounding": {"salience": "hessian"}}


def _fmt(**ppl: dict[str, float]) -> str:
    return "; ".join(f"{name} " + ", ".join(f"{d} {v:.3f}" for d, v in p.items()) for name, p in ppl.items())


# Measured at this size on the AMD EPYC 2-core VM (docs / code / prose): GWQ(gradient) 16.756 / 5.698 /
# 27.095, GWQ(hessian) 16.822 / 5.607 / 26.116. On the earlier VM: gradient 16.980 / 5.630 / 28.604, hessian
# 16.794 / 5.630 / 28.314, GPTQ 17.75 / 6.02 / 29.52; GWQ 3.664 effective bits, GPTQ 3.297.
_GRADIENT = ("both at 3.664 bits; on docs gradient is below (16.756 vs 16.822) here but above on the earlier VM "
             "(16.980 vs 16.794); with 4 x 256 calibration docs 17.30 vs 16.44, and 4 gradient windows give 17.34; the "
             "full model fails on all three domains (results/README.md): on SmolLM2-135M SpQR's leave-one-out Hessian "
             "score picks better outliers than |dL/dw|")
GRADIENT_FAILS = {"code": f"measured: GWQ(gradient) 5.698 vs GWQ(hessian) 5.607 on code; {_GRADIENT}",
                  "prose": f"measured: GWQ(gradient) 27.095 vs GWQ(hessian) 26.116 on prose; {_GRADIENT}"}


@pytest.mark.slow
@pytest.mark.parametrize("domain", [pytest.param(d, marks=pytest.mark.xfail(strict=True, reason=GRADIENT_FAILS[d]))
                                    if d in GRADIENT_FAILS else d for d in DOMAINS])
def test_gradient_salience_at_most_hessian_salience(claim_grid, domain):
    grad, hess = claim_grid("gwq", W3), claim_grid("gwq", W3, HESSIAN)
    assert grad[domain] <= hess[domain], _fmt(gwq_gradient=grad, gwq_hessian=hess)


@pytest.mark.slow
@pytest.mark.parametrize("domain", DOMAINS)
def test_hessian_salience_at_most_gptq_and_gradient_at_most_gptq(claim_grid, domain):
    grad, hess, gptq = claim_grid("gwq", W3), claim_grid("gwq", W3, HESSIAN), claim_grid("gptq", W3)
    assert hess[domain] <= gptq[domain], _fmt(gwq_hessian=hess, gptq=gptq)
    assert grad[domain] <= gptq[domain], _fmt(gwq_gradient=grad, gptq=gptq)


@pytest.mark.slow
def test_effective_bits_beside_gptq_are_the_sparse_overhead(claim_grid):
    claim_grid("gwq", W3), claim_grid("gptq", W3)
    res, ref = claim_grid.results[claim_grid.key("gwq", W3)], claim_grid.results[claim_grid.key("gptq", W3)]
    bits_gwq, bits_gptq = res.effective_bits(), ref.effective_bits()
    n = sum(q.qweight.numel() for q in res.layers.values())
    extra = sum(q.col_idx.numel() * 32 + (q.shape[0] + 1) * 32 for q in res.layers.values())  # CSR, fp16 values
    assert bits_gwq == pytest.approx(bits_gptq + extra / n, abs=1e-9)
    assert res.info["gwq_outlier_fraction"] == pytest.approx(0.01, abs=1e-4)
    assert 3.6 < bits_gwq < 3.7 and math.isclose(bits_gptq, 3.296875)


@pytest.mark.slow
def test_packed_evaluator_runs_dense_plus_sparse_and_matches_the_fake_quantized_model(claim_grid, smol):
    from ptqbench.evaluators import CellContext
    from ptqbench.evaluators.packed import packed_rows

    claim_grid("gwq", W3)
    key = claim_grid.key("gwq", W3)
    res, model = claim_grid.results[key], claim_grid.models[key]
    sch = QuantScheme(**W3)
    cell = CellContext(model, smol.tokenizer, smol.tokenizer_id, "smollm2_135m", "cpu", res, sch, False, 0)
    rows = {r["metric"]: r for r in packed_rows(cell, {"dataset": "docs", "seq_len": 128, "max_windows": 1})}
    print({k: r["value"] for k, r in rows.items()})  # shown with pytest -s
    assert rows["packed_vs_fake_ppl_rel"].get("status", "ok") == "ok" and rows["packed_vs_fake_ppl_rel"]["value"] < 1e-4
    assert rows["packed_weight_bytes"]["value"] >= sum(q.storage_bits() for q in res.layers.values()) / 8
