"""End to end on the embedded model: the smoke sweep, resume, determinism, failed and diverged cells."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptqbench import results
from ptqbench import run as run_mod
from ptqbench.evaluators import CellContext
from ptqbench.evaluators.perplexity import perplexity_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _sweep(tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptqbench", "+sweep=smoke", f"results_root={tmp}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("res")
    p = _sweep(tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "smoke"


def test_smoke_sweep_rows(smoke_dir):
    df = results.load_results(smoke_dir)
    assert set(df["method"]) == {"fp16", "rtn", "gptq"}
    assert (df["status"] == "ok").all()
    for col in results.COLUMNS:
        assert col in df.columns
    ppl = df[df["metric"] == "perplexity"].set_index(["method", "dataset"])["value"]
    for ds in ("docs", "prose"):
        assert 1 < ppl["fp16", ds] < ppl["rtn", ds]  # W4 costs something
        assert ppl["gptq", ds] < 2 * ppl["fp16", ds]
    gptq = df[df["method"] == "gptq"].iloc[0]
    assert gptq["calib"] == "docs" and gptq["calib_n"] == 4 and gptq["calib_seqlen"] == 128
    assert len(gptq["calib_fingerprint"]) == 16
    rtn = df[df["method"] == "rtn"].iloc[0]
    assert rtn["calib"] == "none" and rtn["calib_fingerprint"] == ""
    bits = df[df["metric"] == "effective_bits"].set_index("method")["value"]
    assert bits["rtn"] == pytest.approx(4.3125) and bits["fp16"] == 16
    assert "seq_len=128" in df[df["metric"] == "perplexity"]["protocol"].iloc[0]


def test_resume_computes_nothing(smoke_dir):
    files = sorted(results.cells_dir(smoke_dir).glob("*.parquet"))
    before = {f: f.stat().st_mtime_ns for f in files}
    p = _sweep(smoke_dir.parent)
    assert p.returncode == 0
    assert p.stderr.count("already complete: skipped") + p.stdout.count("already complete: skipped") == 3
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_determinism_same_config_same_values(smoke_dir, compose, tmp_path):
    df = results.load_results(smoke_dir)
    cfg = compose(["+sweep=smoke", "method=gptq", "quant=w4g64", f"results_root={tmp_path}", "force=true"])
    rows = run_mod.run(cfg)
    again = {(r["metric"], r["dataset"]): r["value"] for r in rows if r["metric"] in ("perplexity", "effective_bits")}
    first = df[(df["method"] == "gptq") & df["metric"].isin(["perplexity", "effective_bits"])]
    assert {(r.metric, r.dataset): r.value for r in first.itertuples()} == again


def test_force_recomputes_a_shared_cell_once_per_process(compose, tmp_path):
    def rtn_cell(calib: str):
        cfg = compose(["+sweep=smoke", "method=rtn", f"calib={calib}", f"results_root={tmp_path}", "force=true"])
        return run_mod.run(cfg)

    first = rtn_cell("docs")
    path = results.cell_path(tmp_path / "smoke", first[0]["config_hash"])
    stamp = path.stat().st_mtime_ns
    second = rtn_cell("code")  # RTN ignores the calibration set: same hash, already recomputed by this process
    assert second[0]["config_hash"] == first[0]["config_hash"]
    assert path.stat().st_mtime_ns == stamp
    assert [r["value"] for r in second] == [r["value"] for r in first]


def test_failing_cell_is_recorded_and_not_complete(compose, tmp_path, monkeypatch):
    # calib.seq_len=100000000 is now refused before loading (tests/test_bad_input.py): fail after loading instead
    real = run_mod.evaluators

    def broken(ctx, cfg):
        raise RuntimeError("fewer than seq_len tokens in the evaluation text")

    monkeypatch.setattr(run_mod, "evaluators", lambda: {**real(), "perplexity": broken})
    monkeypatch.setattr(run_mod, "_FAILED_HERE", [])
    cfg = compose(["+sweep=smoke", "method=fp16", f"results_root={tmp_path}"])
    rows = run_mod.run(cfg)
    assert [r["status"] for r in rows] == ["failed"]
    assert "fewer than seq_len" in rows[0]["error"]
    h = rows[0]["config_hash"]
    assert results.cell_status(tmp_path / "smoke", h) == "failed"  # a rerun will retry it
    assert run_mod.failed_cells() == [(h, "fp16", rows[0]["error"])]  # what __main__ lists before exiting 1


def test_non_finite_perplexity_is_diverged(smol):
    import copy

    model = copy.deepcopy(smol.model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    cell = CellContext(model, smol.tokenizer, smol.tokenizer_id, "smollm2_135m", "cpu", None, None, False, 0, None,
                       {})
    rows = perplexity_rows(cell, {"datasets": ["prose"], "seq_len": 32, "max_windows": 1})
    assert rows[0]["status"] == "diverged" and rows[0]["value"] == float("inf")
