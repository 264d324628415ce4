"""The shared sequential calibration pipeline on the embedded model (truncated to a few layers for speed)."""

import copy

import pytest
import torch

from ptqbench.pipeline import capture_layer_inputs, run_sequential
from ptqbench.scheme import QuantScheme

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small(smol):
    m = copy.deepcopy(smol.model)
    m.model.layers = m.model.layers[:3]
    m.config.num_hidden_layers = 3
    return m


def test_unchanged_layers_reproduce_the_model(small):
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    seen = []

    def process(ctx):
        seen.append((ctx.index, list(ctx.targets), ctx.groups()))

    # the pipeline's last hidden states equal the model's own (before the final norm)
    outs = {}

    def keep(ctx):
        process(ctx)
        outs[ctx.index] = ctx

    run_sequential(small, ids, QuantScheme(), keep, batch_size=2)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][2] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    last = torch.cat(outs[2].forward())
    ref = small.model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[-1] has the final norm applied; compare the last layer's raw output through the norm
    assert torch.allclose(small.model.norm(last), ref[-1], atol=1e-4)


def test_hessian_matches_manual(small):
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    got = {}

    def process(ctx):
        if ctx.index == 1:
            got["h"] = ctx.hessians(["mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj"])
            xs = ctx.collect_inputs(["mlp.down_proj"])["mlp.down_proj"]
            x = torch.cat(xs)
            got["manual"] = 2 * x.T @ x / x.shape[0]

    run_sequential(small, ids, QuantScheme(), process, batch_size=1)
    h = got["h"]
    assert h["mlp.down_proj"].shape == (1536, 1536)
    assert torch.allclose(h["mlp.down_proj"], got["manual"], rtol=1e-4, atol=1e-4)
    assert h["self_attn.q_proj"] is h["self_attn.k_proj"]  # shared input, one matrix


def test_hessian_scaled_by_tokens_when_first_name_is_not_its_group_head(small):
    """k_proj alone is hooked through q_proj (its group's head): the token count must still reach the scale."""
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))
    got = {}

    def process(ctx):
        if ctx.index == 0:
            got["alone"] = ctx.hessians(["self_attn.k_proj", "mlp.down_proj"])
            got["full"] = ctx.hessians(["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"])

    run_sequential(small, ids, QuantScheme(), process, batch_size=1)
    for n in ("self_attn.k_proj", "mlp.down_proj"):
        assert torch.equal(got["alone"][n], got["full"][n]), n


def test_capture_records_every_layer(small):
    ids = torch.randint(0, 49152, (3, 8))
    hidden, kwargs = capture_layer_inputs(small, ids, batch_size=2)
    assert [h.shape for h in hidden] == [(2, 8, 576), (1, 8, 576)]
    assert len(kwargs) == 3 and all(len(k) == 2 for k in kwargs)
    assert "position_embeddings" in kwargs[0][0]


class _FreedTemporaries(torch.nn.Module):
    """A layer whose linears read fresh temporaries: each one is freed before the next is allocated, so CPython hands
    the next tensor the freed one's id. Only ``c`` and ``d`` truly share an input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x * 2.0)
        y = y + self.b(x + 1.0)
        h = x - 1.0
        return y + self.c(h) + self.d(h)


def test_groups_are_shared_inputs_not_reused_ids():
    from ptqbench import pipeline
    from ptqbench.pipeline import LayerContext

    layer = _FreedTemporaries()
    x = torch.randn(2, 3, 4)
    for _ in range(20):  # the id of a freed temporary is reused on most runs; every run must group correctly
        pipeline._GROUP_CACHE.clear()
        ctx = LayerContext(0, "layer", layer, [x], [{}], ["a", "b", "c", "d"])
        assert ctx.groups() == [["a"], ["b"], ["c", "d"]]


def test_groups_ignore_pre_hooks_that_replace_a_linears_input():
    """An activation quantizer's pre-hook hands each linear its own new tensor; the grouping must still see the shared
    input (the cache keeps the first grouping for every later model of the process)."""
    from ptqbench import pipeline
    from ptqbench.pipeline import LayerContext

    layer = _FreedTemporaries()
    handles = [getattr(layer, n).register_forward_pre_hook(lambda _m, a: (a[0] * 1.0,)) for n in "abcd"]
    try:
        pipeline._GROUP_CACHE.clear()
        ctx = LayerContext(0, "layer", layer, [torch.randn(2, 3, 4)], [{}], ["a", "b", "c", "d"])
        assert ctx.groups() == [["a"], ["b"], ["c", "d"]]
    finally:
        for h in handles:
            h.remove()
        pipeline._GROUP_CACHE.clear()
