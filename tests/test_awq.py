"""AWQ: the scale search, the clipping search and the folding on random tensors; end to end on a truncated model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.methods.range.clip import ClipConfig, apply_clip, search_clip
from ptqbench.methods.rounding.nearest import NearestConfig
from ptqbench.methods.transform.awq import AWQScaleConfig, awq_scales, linear_scale_loss, search_alpha
from ptqbench.methods.transform.folding import fold_into_norm, fold_into_rows
from ptqbench.quantizer import build_config, get_method
from ptqbench.scheme import QuantScheme, compute_qparams, fake_quantize, rtn_quantize
from ptqbench.scheme import rtn_fake_quant as fake_quant
from ptqbench.stages import group_gram


def _outlier_layer(seed: int = 0, n: int = 2048, d_in: int = 256, d_out: int = 128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    x[:, [3, 70, 150, 201]] *= 25.0  # a few salient input channels, as in LLM activations
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    return w, x


def test_fake_quant_matches_shared_rtn() -> None:
    w = torch.randn(48, 256)
    for sym in (False, True):
        rows = w.reshape(-1, 64)
        scale, zero = compute_qparams(rows, 3, sym)
        ref = fake_quantize(rows, scale, zero, 3).reshape(w.shape)
        assert torch.equal(fake_quant(w, 3, 64, sym), ref)
    # and the stored form (fp16 scales) is the same grid up to fp16 rounding of the scale
    assert torch.allclose(fake_quant(w, 4, 64, False), rtn_quantize(w, 4, 64, False).dequantize(), atol=2e-3)


def test_scales_reduce_output_error_on_outlier_channels() -> None:
    w, x = _outlier_layer()
    x_mean = x.abs().mean(0)
    loss = lambda s: linear_scale_loss(w, x, s, 3, 64, False)  # noqa: E731
    s, alpha, losses = search_alpha(x_mean, loss, 20)
    assert losses[0] == pytest.approx(loss(torch.ones(256)), rel=1e-6)  # α = 0 is plain RTN
    assert alpha > 0
    assert min(losses) < 0.75 * losses[0]  # protecting the salient channels pays
    # the scales grow with the activation magnitude: salient channels get the largest ones
    assert set(torch.topk(s, 4).indices.tolist()) == {3, 70, 150, 201}
    assert float((awq_scales(x_mean, 0.5).max() * awq_scales(x_mean, 0.5).min())) == pytest.approx(1.0, rel=1e-5)


def test_scale_in_the_wrong_direction_hurts() -> None:
    """Guards the sign of the exponent: dividing salient channels (s = mean|x|^-α) must not help."""
    w, x = _outlier_layer(1)
    x_mean = x.abs().mean(0)
    wrong = linear_scale_loss(w, x, awq_scales(x_mean, 0.5).reciprocal(), 3, 64, False)
    right = linear_scale_loss(w, x, awq_scales(x_mean, 0.5), 3, 64, False)
    assert right < linear_scale_loss(w, x, torch.ones(256), 3, 64, False) < wrong


def test_clip_search_lowers_output_error_on_heavy_tails() -> None:
    torch.manual_seed(2)
    w = torch.distributions.StudentT(2.0).sample((96, 128)) * 0.02  # heavy-tailed weights: min-max wastes levels
    x = torch.randn(512, 128)
    gram = group_gram(x, 64)
    assert torch.allclose(gram[1], x[:, 64:].t() @ x[:, 64:], rtol=1e-4, atol=1e-3)
    best = search_clip(w, gram, 3, 64, False, 20, 0.5)
    assert best.shape == (96, 2)
    orig_max = w.abs().reshape(96, 2, 64).amax(-1)
    # brute force: each (row, group) keeps the candidate with the smallest error of its partial output x_g·w_gᵀ
    errs = []
    for i in range(10):
        wq = fake_quant(apply_clip(w, orig_max * (1 - i / 20), 64), 3, 64, False)
        errs.append(torch.stack([((x[:, g:g + 64] @ (wq - w)[:, g:g + 64].t()) ** 2).sum(0) for g in (0, 64)], 1))
    expect = orig_max * (1 - torch.stack(errs).argmin(0) / 20)
    assert (torch.isclose(best, expect).float().mean()) > 0.98  # ties/rounding may flip a few
    assert (best < orig_max).float().mean() > 0.3  # heavy tails: clipping is chosen often
    err = lambda wq: float((x @ (wq - w).t()).pow(2).mean())  # noqa: E731
    assert err(fake_quant(apply_clip(w, best, 64), 3, 64, False)) < 0.95 * err(fake_quant(w, 3, 64, False))


def test_folding_is_exact() -> None:
    torch.manual_seed(3)
    s = torch.rand(32) + 0.5
    x = torch.randn(5, 32)
    norm = nn.RMSNorm(32)
    nn.init.normal_(norm.weight, 1.0, 0.2)
    ref = norm(x) / s
    fold_into_norm(norm, s)
    assert torch.allclose(norm(x), ref, atol=1e-6)

    class OffsetNorm(nn.Module):  # Gemma: x̂ · (1 + w)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(32) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + self.weight)

    on = OffsetNorm()
    ref = on(x) / s
    fold_into_norm(on, s)
    assert torch.allclose(on(x), ref, atol=1e-5)

    prev, nxt = nn.Linear(16, 32), nn.Linear(32, 8)
    ref = nxt(prev(x[:, :16]))
    fold_into_rows(prev, s)
    nxt.weight.data *= s[None, :]
    assert torch.allclose(nxt(prev(x[:, :16])), ref, atol=1e-5)


def test_bad_inputs() -> None:
    awq = get_method("awq")
    with pytest.raises(ConfigError, match="a_bits"):
        awq(QuantScheme(w_bits=4, group_size=-1, a_bits=4))
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="alpha"):
            build_config(awq, {"transform": {"alpha": bad}})
    with pytest.raises(ConfigError, match="n_grid"):
        AWQScaleConfig(n_grid=0)
    with pytest.raises(ConfigError, match="max_shrink"):
        ClipConfig(max_shrink=1.0)
    with pytest.raises(ConfigError, match="max_shrink"):
        build_config(awq, {"range": {"max_shrink": 1.0}})
    with pytest.raises(ConfigError, match="no parameter"):
        build_config(awq, {"transform": {"duo_scaling": True}})
    with pytest.raises(ConfigError, match="no parameter"):  # flat (pre-recipe) parameters are refused by name
        build_config(awq, {"alpha": 0.5})


def test_config_composes_and_refuses_w4a4(compose) -> None:
    from ptqbench.run import resolve

    cell = resolve(compose(["method=awq", "quant=w3g64"]))
    assert cell.method_cls is get_method("awq") and cell.method_cls.recipe == "awq+clip+nearest"
    cfg = cell.method_cfg
    assert (cfg.transform, cfg.range, cfg.rounding) == (AWQScaleConfig(), ClipConfig(), NearestConfig())
    assert cell.calib is not None
    with pytest.raises(ConfigError, match="awq transform stage does not support a_bits=4"):
        resolve(compose(["method=awq", "quant=w4a4"]))
    with pytest.raises(ConfigError, match="alpha"):
        resolve(compose(["method=awq", "quant=w3g64", "method.params.transform.alpha=1.5"]))


@pytest.mark.slow
def test_awq_beats_rtn_on_truncated_model(truncated_smol) -> None:
    """W3 g64 on the first 2 layers: AWQ's output error is well below RTN's (the paper's claim at low bits)."""
    from conftest import last_hidden

    model, calib, ids = truncated_smol(2)
    ref = last_hidden(model, ids)
    scheme = QuantScheme(w_bits=3, group_size=64)
    errs, info = {}, {}
    awq = get_method("awq")
    for name, q in (("rtn", get_method("rtn")(scheme)),
                    ("awq", awq(scheme, build_config(awq, {"transform": {"search_tokens": 256}})))):
        m = copy.deepcopy(model)
        res = q.quantize(m, calib)
        assert len(res.layers) == 2 * 7
        errs[name] = float((last_hidden(m, ids) - ref).pow(2).mean())
        info = res.info
    assert errs["awq"] < 0.8 * errs["rtn"], errs
    assert info["search_gain"] > 1.0 and 0.0 < info["alpha_mean_q_proj"] < 1.0
