"""The FP4 claims of MR-GPTQ's paper (Egiazarian et al., 2025), checked on the embedded model (sized for ``make test``).

On every embedded domain (docs, code, prose): RTN-MXFP4 is worse than RTN-NVFP4 (power-of-two scales on blocks of
32 cost more than E4M3 scales on blocks of 16); MR-GPTQ closes most of that gap (MR-GPTQ-MXFP4 ≤ RTN-NVFP4); and
MR-GPTQ-NVFP4 ≤ GPTQ-INT4 g64 at comparable effective bits (4.5 vs 4.31). The setting is the shared ``claim_grid``
(tests/conftest.py): SmolLM2-135M with its first 4 decoder layers quantized, 8 × 256 docs calibration tokens, 3 ×
256-token windows per domain; full-model numbers in results/README.md (``bash scripts/run_fp4.sh``). A claim the
measurement contradicts stays a strict xfail with the measured numbers as its reason.
"""

from __future__ import annotations

import pytest
from conftest import CLAIM_KEEP as KEEP
from conftest import DOMAINS

pytestmark = pytest.mark.slow

MXFP4 = dict(w_bits=4, group_size=32, sym=True, w_format="mxfp4", keep_fp=KEEP)
NVFP4 = dict(w_bits=4, group_size=16, sym=True, w_format="nvfp4", keep_fp=KEEP)
INT4 = dict(w_bits=4, group_size=64, keep_fp=KEEP)


# Measured at this size on the AMD EPYC 2-core VM (docs / code / prose): MR-GPTQ-MXFP4 15.87 / 5.61 / 23.67,
# RTN-NVFP4 15.84 / 5.51 / 23.63. On the earlier VM: RTN-MXFP4 17.46 / 5.79 / 26.06, RTN-NVFP4 15.84 / 5.51 /
# 23.63, MR-GPTQ-MXFP4 15.71 / 5.62 / 23.61, MR-GPTQ-NVFP4 15.82 / 5.55 / 23.95, GPTQ-INT4 g64 16.04 / 5.57 / 24.34.
_MR_MX = ("of RTN's MXFP4-to-NVFP4 gap (17.46 / 5.79 / 26.06 -> 15.84 / 5.51 / 23.63) MR-GPTQ closes all but "
          "0.03 / 0.10 / 0.04; on docs and prose the ordering is within float-order noise (on the earlier VM "
          "it held: 15.71, 23.61); the full model holds on all three domains (results/README.md)")
MR_MX = {"docs": f"measured: MR-GPTQ-MXFP4 15.87 vs RTN-NVFP4 15.84 on docs; {_MR_MX}",
         "code": f"measured: MR-GPTQ-MXFP4 5.61 vs RTN-NVFP4 5.51 on code; {_MR_MX}",
         "prose": f"measured: MR-GPTQ-MXFP4 23.67 vs RTN-NVFP4 23.63 on prose; {_MR_MX}"}


def _domains(fails: dict[str, str]) -> list:
    """The domains, each a strict xfail where ``fails`` gives the measured reason."""
    return [pytest.param(d, marks=pytest.mark.xfail(strict=True, reason=fails[d])) if d in fails else d
            for d in DOMAINS]


def _fmt(**ppl: dict[str, float]) -> str:
    return "; ".join(f"{name} " + ", ".join(f"{d} {v:.2f}" for d, v in p.items()) for name, p in ppl.items())


@pytest.mark.parametrize("domain", DOMAINS)
def test_rtn_mxfp4_worse_than_rtn_nvfp4(claim_grid, domain):
    mx, nv = claim_grid("rtn", MXFP4), claim_grid("rtn", NVFP4)
    assert mx[domain] > nv[domain], _fmt(rtn_mxfp4=mx, rtn_nvfp4=nv)


@pytest.mark.parametrize("domain", _domains(MR_MX))
def test_mrgptq_mxfp4_at_most_rtn_nvfp4(claim_grid, domain):
    mr, nv = claim_grid("mrgptq", MXFP4), claim_grid("rtn", NVFP4)
    assert mr[domain] <= nv[domain], _fmt(mrgptq_mxfp4=mr, rtn_nvfp4=nv)


@pytest.mark.parametrize("domain", DOMAINS)
def test_mrgptq_nvfp4_at_most_gptq_int4(claim_grid, domain):
    mr, gptq = claim_grid("mrgptq", NVFP4), claim_grid("gptq", INT4)
    bits = {k: claim_grid.results[claim_grid.key(r, s)].effective_bits()
            for k, r, s in (("nv", "mrgptq", NVFP4), ("int", "gptq", INT4))}
    assert abs(bits["nv"] - bits["int"]) < 0.25, bits  # comparable effective bits
    assert mr[domain] <= gptq[domain], _fmt(mrgptq_nvfp4=mr, gptq_int4_g64=gptq)
