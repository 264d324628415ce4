"""The weight-activation claims of the rotation / reordering issue, checked on the embedded model (sized for
``make test``): DartQuant W4A4 ≤ QuaRot W4A4 (Shao et al., 2025) and RPTQ's per-cluster activations (Yuan et al.,
2023) against SmoothQuant and RTN at W4A4 — perplexity on every embedded domain. The setting is the shared
``claim_grid`` (tests/conftest.py): SmolLM2-135M with its first 4 decoder layers quantized, 8 × 256 docs calibration
tokens, 3 × 256-token windows per domain; full-model numbers in results/README.md. A claim the measurement
contradicts stays a strict xfail with the measured numbers as its reason.
"""

from __future__ import annotations

import math

import pytest
from conftest import CLAIM_KEEP as KEEP
from conftest import DOMAINS

pytestmark = pytest.mark.slow

W4A4 = dict(w_bits=4, group_size=-1, a_bits=4, a_mode="dynamic_per_token", keep_fp=KEEP)


def _domains(fails: dict[str, str]) -> list:
    """The domains, each a strict xfail where ``fails`` gives the measured reason."""
    return [pytest.param(d, marks=pytest.mark.xfail(strict=True, reason=fails[d])) if d in fails else d
            for d in DOMAINS]


def _fmt(**ppl: dict[str, float]) -> str:
    return "; ".join(f"{name} " + ", ".join(f"{d} {v:.2f}" for d, v in p.items()) for name, p in ppl.items())


# Measured at this size on the AMD EPYC 2-core VM, one torch thread (as claim cells run, tests/conftest.py; docs /
# code / prose): QuaRot W4A4 18.01 / 5.84 / 28.60, DartQuant W4A4 18.32 / 5.99 / 27.33. DartQuant's SGD carries the
# thread count's float order into its rotations: at 2 threads it measured 18.04 / 6.08 / 29.35 (prose fails there),
# on the earlier VM 18.24 / 6.02 / 29.40 (QuaRot 18.11 / 6.05 / 28.13). Earlier VM, the rest: RPTQ W4A4 23.09 / 6.39
# / 36.60, SmoothQuant W4A4 35.19 / 11.19 / 66.86, RTN W4A4 86.78 / 19.12 / 89.89, RPTQ W4A3 44.05 / 9.07 / 54.80
# (full model, 30 layers: QuaRot 28.40 / 15.53 / 88.60, DartQuant 28.80 / 16.49 / 97.72).
_DART = ("the Whip loss on the calibration activations falls and their per-token maximum drops (full model: 296 -> 272, "
         "2.98 -> 2.53), but perplexity does not follow (full model 28.80 / 16.49 / 97.72 vs 28.40 / 15.53 / 88.60); "
         "prose holds here at one thread (27.33 vs 28.60) and fails at two (29.35)")
DART = {"docs": f"measured: DartQuant 18.32 vs QuaRot 18.01 on docs at W4A4: {_DART}",
        "code": f"measured: DartQuant 5.99 vs QuaRot 5.84 on code at W4A4 (on the earlier VM it held, 6.02 vs "
                f"6.05): {_DART}"}


@pytest.mark.parametrize("domain", _domains(DART))
def test_dartquant_at_most_quarot_w4a4(claim_grid, domain):
    quarot, dart = claim_grid("quarot", W4A4), claim_grid("dartquant", W4A4)
    assert dart[domain] <= quarot[domain], _fmt(quarot=quarot, dartquant=dart)


W4A3 = dict(W4A4, a_bits=3)


@pytest.mark.parametrize("domain", DOMAINS)
def test_rptq_w4a4_at_most_smoothquant_and_rtn(claim_grid, domain):
    rptq, sq, rtn = claim_grid("rptq", W4A4), claim_grid("smoothquant", W4A4), claim_grid("rtn", W4A4)
    assert rptq[domain] <= sq[domain] and rptq[domain] <= rtn[domain], _fmt(rptq=rptq, smoothquant=sq, rtn=rtn)


@pytest.mark.parametrize("domain", DOMAINS)
def test_rptq_w4a3_finite_and_below_rtn(claim_grid, domain):
    """RTN refuses a_bits=3 (no per-cluster activations; tests/test_rptq.py compares with RTN's 3-bit per-token
    activations directly): RPTQ at 3-bit activations against RTN at 4-bit ones, which its 3-bit ones are far above
    (full model, ``scripts/rtn_pertoken_a3.py``: docs 231428 at A3 vs 7373 at A4)."""
    a3, rtn4 = claim_grid("rptq", W4A3), claim_grid("rtn", W4A4)
    assert math.isfinite(a3[domain]) and a3[domain] < rtn4[domain], _fmt(rptq_w4a3=a3, rtn_w4a4=rtn4)
