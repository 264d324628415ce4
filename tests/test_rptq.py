"""RPTQ (``methods/transform/rptq.py``): k-means, the function-preserving reorder, per-cluster activation
quantizers, the recipe end to end, and refusals."""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch
from torch import nn

from ptqbench.actquant import (ClusterActQuantizer, _ActQuantHook, _OwnActQuantHook, activation_quantizer,
                               attach_activation_quant, cluster_qparams, quantize_clusters, set_activation_quantizer)
from ptqbench.errors import ConfigError
from ptqbench.methods.transform.rptq import (RPTQ, RPTQConfig, ReorderOutput, cluster_order, cluster_ranges, kmeans,
                                             reorder_index)
from ptqbench.pipeline import run_sequential
from ptqbench.quantizer import build_config, get_method
from ptqbench.scheme import QuantScheme, quantize_activation


# ------------------------------------------------------------------------------------------------ k-means
def test_kmeans_finds_known_clusters_deterministically():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[-3.0, -8.0], [1.0, 0.0], [9.0, 4.0], [40.0, -40.0]])
    sizes = [50, 30, 15, 5]
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    pts = centers[truth] + 0.3 * torch.randn(len(truth), 2, generator=g)
    shuffle = torch.randperm(len(truth), generator=g)
    pts, truth = pts[shuffle], truth[shuffle]
    labels, found = kmeans(pts, 4, n_init=10, seed=0)
    # the partition is the true one (labels renumbered by the centers' order: first feature ascending)
    assert torch.equal(labels, truth)
    assert torch.allclose(found.float(), centers, atol=0.3)
    again, _ = kmeans(pts, 4, n_init=10, seed=0)
    assert torch.equal(again, labels)
    # k above the number of distinct points: one cluster per distinct point, none empty
    dup = torch.tensor([[0.0, 1.0]] * 6 + [[5.0, 5.0]] * 3)
    lab, c = kmeans(dup, 5)
    assert c.shape[0] == 2 and lab.tolist() == [0] * 6 + [1] * 3


def test_cluster_order_makes_clusters_contiguous():
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    perm, counts = cluster_order(labels)
    assert counts == [2, 2, 3]
    assert labels[perm].tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert perm.tolist() == [1, 3, 2, 6, 0, 4, 5]  # stable: original order inside a cluster
    lo, hi = cluster_ranges(torch.tensor([-1.0, -3, 0, 1, 2, 2, 5]), torch.tensor([1.0, 2, 3, 4, 5, 6, 9]), counts)
    assert lo.tolist() == [-3, 0, 2] and hi.tolist() == [2, 4, 9]


def test_static_ranges_ema_and_minmax():
    from ptqbench.methods.transform.rptq import _RangeStats

    x = torch.tensor([[[0.0, -1.0], [1.0, 1.0]], [[-2.0, 0.0], [4.0, 0.5]], [[0.0, 0.0], [0.5, 9.0]]])  # (win, seq, 2)
    mm, ema = _RangeStats(2, "minmax"), _RangeStats(2, "ema")
    for st in (mm, ema):
        st(x[:2].reshape(-1, 2))  # a chunk of two windows, then one more
        st(x[2:].reshape(-1, 2))
    assert mm.lo.tolist() == [-2.0, -1.0] and mm.hi.tolist() == [4.0, 9.0]
    assert ema.min.tolist() == [-2.0, -1.0] and ema.max.tolist() == [4.0, 9.0]  # k-means uses the true extremes
    lo1, hi1 = torch.tensor([0.99 * 0 - 0.02, 0.99 * -1 + 0]), torch.tensor([0.99 * 1 + 0.04, 0.99 * 1 + 0.005])
    assert torch.allclose(ema.lo, 0.99 * lo1 + 0.01 * torch.tensor([0.0, 0.0]))
    assert torch.allclose(ema.hi, 0.99 * hi1 + 0.01 * torch.tensor([0.5, 9.0]))


# ------------------------------------------------------------------------------------------------ quantizers
def test_cluster_quantizer_grid():
    # each cluster its own asymmetric grid from lo to hi: grid points are exact, other values within half a step
    q = ClusterActQuantizer(3, [2, 3], torch.tensor([-100.0, 1.0]), torch.tensor([-50.0, 8.0]))
    scale, zero = cluster_qparams(torch.tensor([-100.0, 1.0]), torch.tensor([-50.0, 8.0]), 3)
    assert torch.allclose(scale, torch.tensor([50 / 7, 1.0])) and zero.tolist() == [14.0, -1.0]
    x = torch.tensor([[-100.0, -50.0, 1.0, 5.0, 8.0], [-75.3, -60.0, 2.4, 6.6, 100.0]])
    y = q(x)
    assert torch.allclose(y[0], x[0], atol=1e-4)
    assert (y[1, :2] - x[1, :2]).abs().max() <= 50 / 14 + 1e-4 and (y[1, 2:4] - x[1, 2:4]).abs().max() <= 0.5
    assert float(y[1, 4]) == pytest.approx(8.0)  # clipped at the cluster's calibrated max
    assert y.dtype == x.dtype
    per_channel = torch.tensor([50 / 7] * 2 + [1.0] * 3), torch.tensor([14.0] * 2 + [-1.0] * 3)
    assert torch.equal(y, quantize_clusters(x, *per_channel, 3))


def test_per_cluster_beats_per_token_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    n_in = 256
    offset = 3 * torch.randn(n_in, generator=g)  # channels live at different places (the paper's observation)
    spread = 0.2 + torch.rand(n_in, generator=g)
    spread[[5, 77, 130, 201]] = 40.0  # a few outlier channels

    def sample(n):
        return offset + spread * torch.randn(n, n_in, generator=g)

    calib, test = sample(2048), sample(512)
    perm, counts = reorder_index(calib.amax(0), calib.amin(0), 16, 10, 0)
    lo, hi = cluster_ranges(calib.amin(0)[perm], calib.amax(0)[perm], counts)
    xt = test[:, perm]
    for bits in (3, 4, 8):
        cluster_err = (ClusterActQuantizer(bits, counts, lo, hi)(xt) - xt).pow(2).mean()
        token_err = (quantize_activation(xt, bits, "dynamic_per_token", True) - xt).pow(2).mean()
        token_asym = (quantize_activation(xt, bits, "dynamic_per_token", False) - xt).pow(2).mean()
        assert cluster_err < 0.5 * min(token_err, token_asym), (bits, cluster_err, token_err, token_asym)


def test_attach_uses_a_stage_quantizer_and_leaves_per_token_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ref = copy.deepcopy(model)
    scheme = QuantScheme(w_bits=4, a_bits=4)
    own = ClusterActQuantizer(4, [3, 5], torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]))
    set_activation_quantizer(model[1], own)
    assert activation_quantizer(model[1]) is own and activation_quantizer(model[0]) is None
    assert "_ptqbench_act_quantizer" not in model.state_dict() and len(list(model[1].children())) == 0
    assert attach_activation_quant(model, ["0", "1"], scheme) == 2
    assert attach_activation_quant(ref, ["0", "1"], scheme) == 2
    assert isinstance(next(iter(model[0]._forward_pre_hooks.values())), _ActQuantHook)
    assert isinstance(next(iter(model[1]._forward_pre_hooks.values())), _OwnActQuantHook)
    x = 3 * torch.randn(5, 8)
    with torch.no_grad():
        h = model[0](x)
        assert torch.equal(h, ref[0](x))  # the per-token path is untouched
        assert torch.equal(h, nn.functional.linear(quantize_activation(x, 4, "dynamic_per_token", True),
                                                   ref[0].weight, ref[0].bias))
        assert torch.equal(model[1](h), nn.functional.linear(own(h), ref[1].weight, ref[1].bias))


# ------------------------------------------------------------------------------------------------ on SmolLM2
def test_reorder_is_function_preserving_and_leaves_cluster_quantizers(truncated_smol):
    model, calib, ids = truncated_smol(2, n_calib=2)
    orig = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    scheme = QuantScheme(w_bits=4, a_bits=4)
    stage = RPTQ(scheme, RPTQConfig(norm_min_bits=8))  # the reference code's 8-bit norm outputs
    run_sequential(model, calib.input_ids, scheme, stage.apply_layer, batch_size=4)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    layer, layer0 = model.model.layers[0], orig.model.layers[0]
    # the weights really were reordered (same columns, another order), the norm writes in that order
    wq, wq0 = layer.self_attn.q_proj.weight, layer0.self_attn.q_proj.weight
    assert not torch.equal(wq, wq0)
    assert torch.equal(wq.sum(0).sort().values, wq0.sum(0).sort().values)
    assert any(isinstance(h, ReorderOutput) for h in layer.input_layernorm._forward_hooks.values())
    # one quantizer per input, shared by q/k/v and by gate/up; clusters cover the input
    att, mlp = layer.self_attn, layer.mlp
    qkv = activation_quantizer(att.q_proj)
    assert qkv is activation_quantizer(att.k_proj) is activation_quantizer(att.v_proj)
    assert activation_quantizer(mlp.gate_proj) is activation_quantizer(mlp.up_proj)
    hd = att.head_dim
    n_heads = att.o_proj.in_features // hd
    for lin, n_clusters, bits in ((att.q_proj, 32, 8), (att.o_proj, 4 * n_heads, 4), (mlp.gate_proj, 32, 8),
                                  (mlp.down_proj, 32, 4)):
        q = activation_quantizer(lin)
        assert isinstance(q, ClusterActQuantizer) and q.bits == bits
        assert sum(q.counts) == lin.in_features and q.n_clusters == n_clusters
        assert bool((q.hi > q.lo).all())
    info = stage.info()
    assert info["rptq_clusters_per_input"] == pytest.approx((32 + 4 * n_heads + 32 + 32) / 4)
    assert 0 < info["rptq_cluster_range_fraction"] < 0.5  # clusters are much narrower than the whole tensor


def _loss_and_hidden(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    logits = out.logits[:, :-1].float()
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(loss), out.hidden_states[-1]


def test_recipe_end_to_end_w4a4_w4a3(truncated_smol):
    """The recipe on a 2-layer SmolLM2: finite next-token loss, and the decoder's output error against floating point
    ordered as the paper claims (per-cluster 4 and 3 bits far below per-token RTN)."""
    model, calib, ids = truncated_smol(2, n_calib=2)
    _, ref = _loss_and_hidden(model, ids)
    err = {}
    for recipe, a_bits in (("rtn", 4), ("rtn", 3), ("rptq+minmax+gptq", 4), ("rptq+minmax+gptq", 3), ("rptq+rtn", 3)):
        m = copy.deepcopy(model)
        scheme = QuantScheme(w_bits=4, a_bits=a_bits)
        cls = get_method(recipe)
        # rtn refuses a_bits=3 by design: its weights do not depend on a_bits, so they are made at a_bits=4 and the
        # 3-bit per-token quantizers attached to them (as scripts/rtn_pertoken_a3.py measures the full model)
        res = cls(dataclasses.replace(scheme, a_bits=4) if recipe == "rtn" else scheme, None).quantize(m, calib)
        assert len(res.layers) == 14
        assert attach_activation_quant(m, list(res.layers), scheme, calib.input_ids) == 14
        if recipe != "rtn":
            assert cls.family == "reordering" and res.info["rptq_clusters_per_input"] > 1
            mods = dict(m.named_modules())
            hooks = [h for n in res.layers for h in mods[n]._forward_pre_hooks.values()]
            assert len(hooks) == 14 and all(isinstance(h, _OwnActQuantHook) for h in hooks)
            assert all(h.quantizer.bits == a_bits for h in hooks)
        loss, hidden = _loss_and_hidden(m, ids)
        assert 0 < loss < 30  # finite (a 2-layer model's next-token loss is high whatever the quantization)
        err[(recipe, a_bits)] = float((hidden - ref).norm() / ref.norm())
    print({f"{r} a{b}": round(v, 4) for (r, b), v in err.items()})
    assert err[("rptq+minmax+gptq", 4)] < err[("rptq+minmax+gptq", 3)] < err[("rtn", 4)] < err[("rtn", 3)]
    assert err[("rptq+minmax+gptq", 4)] < 0.6 * err[("rtn", 4)]
    assert err[("rptq+rtn", 3)] < 0.5 * err[("rtn", 3)]


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("params,match", [
    ({"clusters_qkv": 0}, "rptq.clusters_qkv=0: use a positive number"),
    ({"clusters_o": -1}, "rptq.clusters_o=-1"),
    ({"act_range": "mse"}, "rptq.act_range='mse': use one of"),
    ({"kmeans_init": 0}, "rptq.kmeans_init=0"),
    ({"norm_min_bits": 1}, "rptq.norm_min_bits=1"),
])
def test_bad_configs_refused_in_one_line(params, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_config(get_method("rptq+minmax+gptq"), {"transform": params})
    assert "\n" not in str(e.value)


def test_too_many_clusters_refused_at_the_layer(truncated_smol):
    model, calib, _ = truncated_smol(1, n_calib=1, seq_len=32)
    scheme = QuantScheme(w_bits=4, a_bits=4)
    stage = RPTQ(scheme, RPTQConfig(clusters_o=65))  # SmolLM2 heads have 64 channels
    with pytest.raises(ConfigError, match=r"rptq.clusters_o=65 is more than the 64 channels .* use at most 64") as e:
        run_sequential(model, calib.input_ids, scheme, stage.apply_layer, batch_size=1)
    assert "\n" not in str(e.value)


def test_a_bits_3_refused_without_per_cluster_activations(compose):
    from ptqbench import run as run_mod

    for method in ("rtn", "gptq", "smoothquant", "quarot"):
        run_mod._CACHE.clear()
        t = time.perf_counter()
        with pytest.raises(ConfigError, match="does not support a_bits=3") as e:
            run_mod.run(compose([f"method={method}", "quant=w4a3"]))
        assert "\n" not in str(e.value) and time.perf_counter() - t < 5
        assert not any(isinstance(k, tuple) and k[0] == "model" for k in run_mod._CACHE)


def test_rptq_resolves_at_w4a3_and_conf_matches_defaults(compose):
    from omegaconf import OmegaConf

    from ptqbench import conf_dir
    from ptqbench import run as run_mod
    from ptqbench.recipe import parse_recipe, stage_defaults

    cell = run_mod.resolve(compose(["method=rptq+minmax+gptq", "quant=w4a3"]))
    assert cell.scheme.a_bits == 3 and cell.method_cls.family == "reordering"
    # conf/method/rptq.yaml holds the stage defaults: the alias and the spelled-out recipe are one cell
    conf = OmegaConf.to_container(OmegaConf.load(conf_dir() / "method" / "rptq.yaml"))
    assert conf["params"] == stage_defaults(parse_recipe("rptq+minmax+gptq"))
    alias = run_mod.resolve(compose(["method=rptq", "quant=w4a3"]))  # the alias accepts a_bits=3 through the recipe
    assert alias.method_cls.recipe == "rptq+minmax+gptq" and alias.config_hash == cell.config_hash
