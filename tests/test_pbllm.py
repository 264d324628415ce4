"""PB-LLM: exact salient fraction, L2-optimal binarization scale, honest storage, GPTQ compensation, end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from ptqbench.errors import ConfigError
from ptqbench.methods.pbllm import PBLLM, PBLLMConfig, binary_scale, pbllm_quantize
from ptqbench.scheme import QuantScheme, group_index


def _problem(out_f=96, in_f=256, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) * (0.2 + 3 * torch.rand(in_f, generator=g))  # uneven input scales
    return w, x, 2 * x.T @ x / n


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_keeps_exactly_the_requested_salient_fraction(fraction):
    w, _, h = _problem()
    qw = pbllm_quantize(w, h, salient_fraction=fraction)
    assert int(qw.salient_mask.sum()) == round(fraction * w.numel())
    assert qw.meta["salient_fraction"] == pytest.approx(fraction, abs=1 / w.numel())


def test_identity_hessian_gives_magnitude_saliency_and_the_l2_optimal_scale():
    w, _, _ = _problem()
    qw = pbllm_quantize(w, torch.eye(w.shape[1]), salient_fraction=0.1)  # no cross-column error feedback
    mask = qw.salient_mask
    assert float(w.abs()[~mask].max()) <= float(w.abs()[mask].min())  # the largest |w| are the salient ones
    alpha = (w.abs() * ~mask).sum(1) / (~mask).sum(1)  # mean |w| over each row's non-salient weights
    assert torch.allclose(qw.scales.float()[:, 0], alpha, rtol=1e-3)  # fp16-stored
    deq = qw.dequantize()
    sign = torch.where(w >= 0, 1.0, -1.0)
    assert torch.allclose(deq[~mask], (sign * qw.scales.float())[~mask])  # binary part is ±α exactly
    step = (w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)) / 255
    assert ((deq - w).abs()[mask] <= (step[:, None].expand_as(w)[mask] / 2 + 1e-3)).all()  # 8-bit grid


def test_binary_scale_minimizes_the_l2_error():
    w = torch.randn(8, 64)
    keep = torch.rand(8, 64) > 0.2
    g_idx = group_index(64, 16)
    alpha = binary_scale(w, keep, g_idx, 4)  # (8, 4)
    sign = torch.sign(w)

    def err(a):
        return (((w - a[:, g_idx] * sign) ** 2) * keep).sum()

    base = err(alpha)
    for eps in (1e-2, -1e-2):
        assert err(alpha + eps) > base  # any other scale is worse: the closed form is the optimum
    grad = (((alpha[:, g_idx] * sign - w) * sign) * keep)  # d/dα of the error, summed per group: zero at the optimum
    per_group = torch.zeros(8, 4).scatter_add_(1, g_idx[None].expand(8, -1).long(), grad)
    assert per_group.abs().max() < 1e-5


def test_error_compensation_lowers_the_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    # correlated inputs (low rank + noise), as LLM activations are: the feedback has something to exploit
    x = torch.randn(1024, 32, generator=g) @ torch.randn(32, 256, generator=g)
    x = x + 0.3 * torch.randn(1024, 256, generator=g)
    h = 2 * x.T @ x / 1024
    with_h = pbllm_quantize(w, h).dequantize()
    without = pbllm_quantize(w, torch.diag(h.diagonal())).dequantize()  # same saliency scale, no cross feedback
    err = lambda q: float((x @ (q - w).T).norm() / (x @ w.T).norm())  # noqa: E731
    assert err(with_h) < 0.6 * err(without)


def test_storage_accounting_is_honest():
    w, _, h = _problem(out_f=64, in_f=128)
    qw = pbllm_quantize(w, h, salient_fraction=0.1)
    n_sal, n = int(qw.salient_mask.sum()), w.numel()
    expected = (n - n_sal) * 1 + n_sal * 8 + n + 64 * 16 + 64 * (16 + 8)  # codes, bitmap, α per row, salient grid
    assert qw.storage_bits() == expected
    assert 2.7 < qw.storage_bits() / n < 3.2


@pytest.mark.slow
def test_end_to_end_on_truncated_smollm2(smol):
    from ptqbench.data import CalibSpec, draw_calibration

    base = smol.model.model
    full = base.layers
    try:
        base.layers = torch.nn.ModuleList(full[:2])
        model = copy.deepcopy(smol.model)
    finally:
        base.layers = full
    model.config.num_hidden_layers = 2
    calib = draw_calibration(CalibSpec("docs", (("docs", 1.0),), 4, 64), 0, smol.tokenizer, "smol-test")
    res = PBLLM(QuantScheme(w_bits=2, group_size=-1), PBLLMConfig()).quantize(model, calib)
    assert len(res.layers) == 14
    assert res.info["effective_bits_paper"] == pytest.approx(1.7)
    assert 2.7 < res.effective_bits() < 3.0
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(model.get_submodule(name).weight.data, res.layers[name].dequantize())
    # every row holds the binary values ±α and the salient values only
    lin_w = model.get_submodule(name).weight.data
    qw = res.layers[name]
    assert torch.equal(lin_w[~qw.salient_mask].abs(), qw.scales.float()[:, 0:1].expand_as(lin_w)[~qw.salient_mask])


def test_bad_inputs_raise_config_error():
    for f in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            PBLLMConfig(salient_fraction=f)
    with pytest.raises(ConfigError):
        PBLLM(QuantScheme(w_bits=4, group_size=64))  # PB-LLM sits in the 2-bit class
    with pytest.raises(ConfigError):
        PBLLM(QuantScheme(w_bits=2, group_size=64, a_bits=8))  # weight-only
