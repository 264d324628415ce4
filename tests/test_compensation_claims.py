"""The compensation family's claims, checked on the embedded model (sized for ``make test``).

GPTAQ ≤ GPTQ at W3 g64 and W2 g64 (Li et al., 2025); residual-aware compensation ≤ GPTAQ at W3 g64 (Li et al., 2026);
FOEM ≤ GPTQ at W3 g64 (Zheng et al., 2026); QuaRot+GPTAQ ≤ QuaRot+GPTQ at W4A4 — perplexity, on every embedded
evaluation domain (docs, code, prose). The setting is the shared ``claim_grid`` (tests/conftest.py): the whole
SmolLM2-135M with its first 4 decoder layers quantized, 8 × 256 docs calibration tokens, 3 × 256-token windows per
domain. The full-model numbers (all 30 layers, 32 × 512, 20 × 512 windows) are in results/README.md
(``bash scripts/run_compensation.sh``). A claim the measurement contradicts stays a strict xfail with the measured
numbers as its reason.
"""

from __future__ import annotations

import pytest
from conftest import CLAIM_KEEP as KEEP
from conftest import DOMAINS

pytestmark = pytest.mark.slow

W3 = dict(w_bits=3, group_size=64, keep_fp=KEEP)
W2 = dict(w_bits=2, group_size=64, keep_fp=KEEP)
W4A4 = dict(w_bits=4, group_size=-1, a_bits=4, a_mode="dynamic_per_token", keep_fp=KEEP)


# Measured at this size on the AMD EPYC 2-core VM (docs / code / prose): W3 g64 GPTQ 17.69 /
# 6.00 / 30.60, GPTAQ 17.18 / 5.86 / 30.48, rescomp 17.85 / 5.85 / 31.50, FOEM 17.45 / 5.88 / 28.40; W2 g64 GPTQ
# 88.94 / 37.23 / 331.74, GPTAQ 118.62 / 47.63 / 691.49; W4A4 QuaRot+GPTQ 18.01 / 5.84 / 28.60, QuaRot+GPTAQ 18.03 /
# 6.04 / 28.06. On the earlier VM the same cells measured W3 GPTQ 17.75 / 6.02 / 29.51, GPTAQ 17.88 / 5.99 /
# 29.58, rescomp 17.58 / 5.96 / 32.58, FOEM 17.42 / 5.87 / 31.35; W2 GPTQ 166.07 / 124.03 / 293.92, GPTAQ 150.83 /
# 98.74 / 628.59; W4A4 18.11 / 6.05 / 28.13 and 17.96 / 5.88 / 30.76: with 4 quantized layers several of these
# orderings are decided by the float summation order (which rounding codes flip), not by the method.
PROSE = ("prose is the domain furthest from the docs calibration: the more closely a method fits its layers to the "
         "calibration inputs (GPTAQ to the FP model's outputs on them, rescomp and FOEM on top), the further it moves "
         "from what prose needs (GPTQ alone is above RTN on prose at W3 g64 on the full model, results/README.md)")
ORDER = "within float-order noise at this size: it held on the earlier VM"
GPTAQ_W3: dict[str, str] = {}  # holds on all three domains here
_W2 = ("at W2 g64 both collapse on 4 layers and the ordering follows the float summation order (on the earlier VM GPTAQ held "
       "on docs and code: 150.83 vs 166.07, 98.74 vs 124.03, and failed on prose 628.59 vs 293.92)")
GPTAQ_W2 = {"docs": f"measured: GPTAQ 118.62 vs GPTQ 88.94 on docs at W2 g64; {_W2}",
            "code": f"measured: GPTAQ 47.63 vs GPTQ 37.23 on code at W2 g64; {_W2}",
            "prose": f"measured: GPTAQ 691.49 vs GPTQ 331.74 on prose at W2 g64; {PROSE}"}
RESCOMP = {"docs": f"measured: rescomp 17.85 vs GPTAQ 17.18 on docs at W3 g64 (code 5.85 vs 5.86 holds); {ORDER} "
                   f"(17.58 vs 17.88)",
           "prose": f"measured: rescomp 31.50 vs GPTAQ 30.48 on prose at W3 g64; {PROSE}"}
FOEM: dict[str, str] = {}  # holds on all three domains here
QUAROT = {"docs": f"measured: QuaRot+GPTAQ 18.03 vs QuaRot+GPTQ 18.01 on docs at W4A4 (prose 28.06 vs 28.60 holds); "
                  f"{ORDER} (17.96 vs 18.11)",
          "code": f"measured: QuaRot+GPTAQ 6.04 vs QuaRot+GPTQ 5.84 on code at W4A4 (prose 28.06 vs 28.60 holds); "
                  f"{ORDER} (5.88 vs 6.05)"}


def _domains(fails: dict[str, str]) -> list:
    """The domains, each a strict xfail where ``fails`` gives the measured reason."""
    return [pytest.param(d, marks=pytest.mark.xfail(strict=True, reason=fails[d])) if d in fails else d
            for d in DOMAINS]


def _fmt(**ppl: dict[str, float]) -> str:
    return "; ".join(f"{name} " + ", ".join(f"{d} {v:.2f}" for d, v in p.items()) for name, p in ppl.items())


@pytest.mark.parametrize("domain", _domains(GPTAQ_W3))
def test_gptaq_at_most_gptq_w3(claim_grid, domain):
    gptq, gptaq = claim_grid("gptq", W3), claim_grid("gptaq", W3)
    assert gptaq[domain] <= gptq[domain], _fmt(gptq=gptq, gptaq=gptaq)


@pytest.mark.parametrize("domain", _domains(GPTAQ_W2))
def test_gptaq_at_most_gptq_w2(claim_grid, domain):
    gptq, gptaq = claim_grid("gptq", W2), claim_grid("gptaq", W2)
    assert gptaq[domain] <= gptq[domain], _fmt(gptq=gptq, gptaq=gptaq)


@pytest.mark.parametrize("domain", _domains(RESCOMP))
def test_rescomp_at_most_gptaq(claim_grid, domain):
    gptaq, rescomp = claim_grid("gptaq", W3), claim_grid("rescomp", W3)
    assert rescomp[domain] <= gptaq[domain], _fmt(gptaq=gptaq, rescomp=rescomp)


@pytest.mark.parametrize("domain", _domains(FOEM))
def test_foem_at_most_gptq(claim_grid, domain):
    gptq, foem = claim_grid("gptq", W3), claim_grid("foem", W3)
    assert foem[domain] <= gptq[domain], _fmt(gptq=gptq, foem=foem)


@pytest.mark.parametrize("domain", _domains(QUAROT))
def test_quarot_gptaq_at_most_quarot_gptq_w4a4(claim_grid, domain):
    gptq, gptaq = claim_grid("quarot", W4A4), claim_grid("quarot+gptaq", W4A4)
    assert gptaq[domain] <= gptq[domain], _fmt(quarot_gptq=gptq, quarot_gptaq=gptaq)
