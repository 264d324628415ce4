"""The benchmark paper's combination claims, checked on the embedded model (truncated to stay in ``make test``).

Zhao et al., "Benchmarking Post-Training Quantization in LLMs: Comprehensive Taxonomy, Unified Evaluation, and
Comparative Analysis": a compensation method combined with another strategy gives the most robust results. Checked
here, per embedded evaluation domain (docs, code, prose):

- W3 g64: AWQ+GPTQ ≤ min(AWQ, GPTQ) in perplexity, for both readings of AWQ+GPTQ: ``awq+gptq`` (AWQ's scaling,
  then GPTQ) and ``awq+clip+gptq`` (AWQ's scaling and clip search, then GPTQ: what the AWQ paper's combination with
  GPTQ applies);
- W3 g64: QuaRot+GPTQ ≤ QuaRot+RTN;
- W4A8 (per-token dynamic activations): SmoothQuant+GPTQ ≤ SmoothQuant+RTN.

Sized for ``make test``: the whole SmolLM2-135M, of which only the first ``LAYERS`` decoder layers are quantized
(the rest kept in floating point through the scheme's ``keep_fp``), calibrated on 8 × 256 docs tokens, perplexity
on 3 held-out 256-token windows per domain — real perplexities of the real model, the same protocol for every
recipe. The full numbers (all 30 layers, 32 × 512, 20 × 512 windows) are in results/README.md
(``bash scripts/run_grid.sh``). A claim that the measurement contradicts is kept as a strict xfail with the measured
numbers as its reason.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CLAIM_KEEP as KEEP
from conftest import DOMAINS

pytestmark = pytest.mark.slow

# the real model with its first 4 decoder layers quantized through the session fixture ``claim_grid``
# (tests/conftest.py), so a recipe another claim module also measures (GPTQ at W3 g64) is quantized once per session

W3 = dict(w_bits=3, group_size=64, keep_fp=KEEP)
W4A8 = dict(w_bits=4, group_size=-1, a_bits=8, a_mode="dynamic_per_token", keep_fp=KEEP)


@pytest.fixture(scope="module")
def grid(claim_grid):
    return claim_grid


# Measured at this size (first 4 layers quantized, 8 x 256 docs calibration, 3 x 256 windows; docs / code / prose) at
# the AMD EPYC 2-core VM: AWQ 16.54 / 6.02 / 27.26, GPTQ 17.69 / 6.00 / 30.60, awq+gptq 17.48 / 5.96 / 32.59,
# awq+clip+gptq 18.06 / 6.20 / 30.95. On the earlier VM: AWQ 16.53 / 6.01 / 27.64, GPTQ 17.75 / 6.02 / 29.52,
# awq+gptq 17.65 / 6.15 / 29.56, awq+clip+gptq 17.71 / 6.09 / 31.34; QuaRot+RTN 23.90 / 6.62 / 33.98, QuaRot+GPTQ
# 16.99 / 5.73 / 27.61; W4A8 SmoothQuant+RTN 17.06 / 5.70 / 25.32, SmoothQuant+GPTQ 16.75 / 5.66 / 26.04.
AWQ_GPTQ_FAILS = ("measured: AWQ alone (awq+clip+nearest) is below both combinations on docs and prose — AWQ 16.54 / "
                  "6.02 / 27.26 vs awq+gptq 17.48 / 5.96 / 32.59 and awq+clip+gptq 18.06 / 6.20 / 30.95 (docs / code "
                  "/ prose; GPTQ 17.69 / 6.00 / 30.60); only awq+gptq on code holds (5.96), by less than the "
                  "float-order noise of this size. On this model GPTQ's Hessian-weighted error feedback on the "
                  "AWQ-scaled weights does not keep AWQ's gain")
SQ_PROSE_FAILS = ("measured (earlier VM; it fails on the AMD EPYC VM too): W4A8 SmoothQuant+GPTQ 26.04 vs "
                  "SmoothQuant+RTN 25.32 on prose (docs 16.75 vs 17.06 and code 5.66 vs 5.70 hold): GPTQ fits its "
                  "updates to the docs calibration inputs, and prose is the domain furthest from docs (GPTQ alone is "
                  "also worse than RTN on prose at W3 g64, results/README.md)")


def _xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


def _fmt(**ppl: dict[str, float]) -> str:
    return "; ".join(f"{name} " + ", ".join(f"{d} {v:.2f}" for d, v in p.items()) for name, p in ppl.items())


@pytest.mark.parametrize("combo,domain", [(c, d) if (c, d) == ("awq+gptq", "code") else
                                          pytest.param(c, d, marks=_xfail(AWQ_GPTQ_FAILS))
                                          for c in ("awq+gptq", "awq+clip+gptq") for d in DOMAINS])
def test_awq_gptq_at_most_min_of_awq_and_gptq(grid, combo, domain):
    awq, gptq, both = grid("awq", W3), grid("gptq", W3), grid(combo, W3)
    assert both[domain] <= min(awq[domain], gptq[domain]), _fmt(awq=awq, gptq=gptq, **{combo: both})


@pytest.mark.parametrize("domain", DOMAINS)
def test_quarot_gptq_at_most_quarot_rtn(grid, domain):
    rtn, gptq = grid("quarot+rtn", W3), grid("quarot+gptq", W3)
    assert gptq[domain] <= rtn[domain], _fmt(quarot_rtn=rtn, quarot_gptq=gptq)


@pytest.mark.parametrize("domain", ["docs", "code", pytest.param("prose", marks=_xfail(SQ_PROSE_FAILS))])
def test_smoothquant_gptq_at_most_smoothquant_rtn_w4a8(grid, domain):
    rtn, gptq = grid("smoothquant+rtn", W4A8), grid("smoothquant+gptq", W4A8)
    assert gptq[domain] <= rtn[domain], _fmt(smoothquant_rtn=rtn, smoothquant_gptq=gptq)


def test_recipes_change_the_numbers(grid):
    """The grid is not a relabelling: the recipes of one scheme give distinct, finite perplexities."""
    vals = {r: grid(r, W3)["docs"] for r in ("awq", "gptq", "awq+gptq", "awq+clip+gptq", "quarot+rtn", "quarot+gptq")}
    assert all(torch.isfinite(torch.tensor(v)) for v in vals.values())
    assert len({round(v, 6) for v in vals.values()}) == len(vals), vals
