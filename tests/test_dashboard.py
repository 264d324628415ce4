"""Regression dashboard: exit codes, tolerances, bad inputs, and the page as a real headless browser shows it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ptqbench.dashboard import Tolerances, compare, judge, main, metric_kind
from ptqbench.results import to_frame, write_cell

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
PPL = "ppl:concat-windows;split=eval;seq_len=512;windows=40;tokens=20480"


def results(model: str = "tiny-lm") -> pd.DataFrame:
    """A small sweep: fp16, RTN and GPTQ (two seeds) at W4/W3 with perplexity, accuracy, bits, time."""
    rows = []

    def cell(method, family, quant, bits, calib, seed, ppl, acc, qtime):
        base = dict(model=model, method=method, family=family, quant=quant, w_bits=bits, a_bits=16, group_size=64,
                    sym=False, calib=calib, calib_n=128 if calib != "none" else None, seed=seed,
                    calib_seqlen=512 if calib != "none" else None, config_hash=f"{method}-{quant}-{calib}-{seed}",
                    calib_fingerprint=f"fp{seed}" if calib != "none" else "", group="", status="ok",
                    git_sha="1111111abcdef", versions="torch=2.13.0", device="cpu", timestamp="2026-11-20T10:00:00Z",
                    wall_s=12.0, sweep="smoke")
        rows.extend([dict(base, metric="perplexity", dataset="docs", value=ppl, protocol=PPL),
                     dict(base, metric="worst_group_acc", dataset="domains", value=acc, unit="%", protocol="acc:v1"),
                     dict(base, metric="effective_bits", dataset="", value=bits + 0.5, protocol="bits:v1"),
                     dict(base, metric="quant_time_s", dataset="", value=qtime, unit="s", protocol="wall"),
                     dict(base, metric="latency_us", dataset="4096x11008", value=float("nan"), status="skipped",
                          protocol="")])

    cell("fp16", "baseline", "fp16", 16, "none", None, 16.05, 50.0, 0.0)
    cell("rtn", "calibration-free", "w4g64", 4, "none", None, 21.1, 44.0, 0.5)
    cell("rtn", "calibration-free", "w3g64", 3, "none", None, 48.4, 31.0, 0.5)
    for seed in (0, 1):
        cell("gptq", "compensation", "w4g64", 4, "docs", seed, 18.0 + seed * 0.1, 47.0, 30.0)
        cell("gptq", "compensation", "w3g64", 3, "docs", seed, 26.0 + seed * 0.1, 40.0, 30.0)
    return to_frame(rows)


def write(df: pd.DataFrame, folder: Path) -> Path:
    for h, g in df.groupby("config_hash"):
        write_cell(folder, h, g.to_dict("records"))
    return folder


def injected(df: pd.DataFrame) -> pd.DataFrame:
    """The current run: new provenance, GPTQ W3 seed 1 perplexity up 10% (a regression), RTN W3 accuracy up 3
    points (an improvement), quantization twice as slow (informational only), and the fp16 cell gone."""
    cur = df.copy()
    cur["git_sha"], cur["timestamp"], cur["device"] = "2222222fedcba", "2026-11-23T09:00:00Z", "cpu (ci)"
    cur["config_hash"] = cur["config_hash"] + "-v2"  # a new hash recipe must not break matching
    sel = (cur["method"] == "gptq") & (cur["quant"] == "w3g64") & (cur["seed"] == 1)
    cur.loc[sel & (cur["metric"] == "perplexity"), "value"] *= 1.10
    cur.loc[(cur["method"] == "rtn") & (cur["quant"] == "w3g64") & (cur["metric"] == "worst_group_acc"), "value"] += 3
    cur.loc[cur["metric"] == "quant_time_s", "value"] *= 2
    return cur[cur["method"] != "fp16"]


@pytest.fixture(scope="module")
def regressed(tmp_path_factory) -> tuple[int, Path, str]:
    """Run the CLI once on the injected pair; (exit code, page, stdout)."""
    tmp = tmp_path_factory.mktemp("dash")
    base, cur = write(results(), tmp / "base"), write(injected(results()), tmp / "cur")
    page = tmp / "page.html"
    p = subprocess.run([sys.executable, "-m", "ptqbench.dashboard", "--baseline", str(base), "--current", str(cur),
                        "--out", str(page)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, page, p.stdout


def test_regression_exits_1_and_is_on_the_page(regressed):
    code, page, out = regressed
    assert code == 1
    assert "1 regression(s), 1 improvement(s), 1 cell(s) missing in current" in out
    assert "REGRESSION gptq w3g64 calib=docs seed=1 perplexity/docs: 26.1 -> 28.71 (+10.00%)" in out
    html = page.read_text()
    assert "FAIL: 1 metric(s) regressed" in html
    assert '<tr class="regression">' in html and '<tr class="improvement">' in html
    assert "data:image/png;base64," in html  # plots inlined: the page needs nothing beside it
    assert PPL in html and "2222222fedcb" in html and "1111111abcde" in html  # protocol and provenance shown


def test_identical_pair_exits_0(tmp_path, capsys):
    base = write(results(), tmp_path / "base")
    assert main(["--baseline", str(base), "--current", str(base), "--out", str(tmp_path / "p.html"),
                 "--no-plots"]) == 0
    assert capsys.readouterr().out.startswith("0 regression(s), 0 improvement(s), 0 cell(s) missing")
    assert "PASS" in (tmp_path / "p.html").read_text()


def test_tolerances():
    t = Tolerances(rtol_ppl=0.02, atol_acc=1.0, latency_ratio=1.10)
    assert judge("ppl", 20.0, 20.3, "ok", "ok", "", t)[0] == "unchanged"  # +1.5%
    assert judge("ppl", 20.0, 20.5, "ok", "ok", "", t)[0] == "regression"  # +2.5%
    assert judge("ppl", 20.0, 19.0, "ok", "ok", "", t)[0] == "improvement"
    assert judge("acc", 45.0, 44.5, "ok", "ok", "%", t)[0] == "unchanged"
    assert judge("acc", 45.0, 43.5, "ok", "ok", "%", t)[0] == "regression"
    assert judge("acc", 0.450, 0.435, "ok", "ok", "", t)[0] == "regression"  # fractions are judged in points
    assert judge("latency", 10.0, 10.5, "ok", "ok", "us", t)[0] == "unchanged"
    assert judge("latency", 10.0, 12.0, "ok", "ok", "us", t)[0] == "regression"
    assert judge("info", 1.0, 100.0, "ok", "ok", "s", t)[0] == "info"
    assert judge("ppl", 20.0, float("nan"), "ok", "diverged", "", t)[0] == "regression"
    assert judge("ppl", float("nan"), 20.0, "diverged", "ok", "", t)[0] == "improvement"
    assert judge("latency", 10.0, float("nan"), "ok", "skipped", "us", t)[0] == "not compared"
    assert [metric_kind(m) for m in ("perplexity", "worst_group_acc", "latency_us", "quant_time_s",
                                     "peak_host_mem_gib", "effective_bits")] == \
        ["ppl", "acc", "latency", "info", "info", "bits"]


def test_compare_matches_by_config_not_hash():
    comp = compare(results(), injected(results()))
    assert len(comp.regressions) == 1 and len(comp.improvements) == 1
    assert list(comp.missing_in_current["method"]) == ["fp16"] and comp.new_in_current.empty
    qtime = comp.rows[comp.rows["metric"] == "quant_time_s"]
    assert set(qtime["verdict"]) == {"info"} and set(qtime["change"]) == {"2.00x"}


def test_calibration_free_cells_match_whatever_seed_ran_first():
    base, cur = results(), results()
    cur.loc[cur["calib"] == "none", "seed"] = 2  # a seed sweep computed RTN once, under seed 2 this time
    comp = compare(base, cur)
    assert comp.missing_in_current.empty and comp.new_in_current.empty and comp.regressions.empty


def test_a_cell_that_now_fails_is_a_regression():
    base = results()
    gone = (base["method"] == "gptq") & (base["quant"] == "w4g64") & (base["seed"] == 0)
    crash = dict(base[gone].iloc[0].to_dict(), metric="cell", dataset="", value=float("nan"), status="failed",
                 error="RuntimeError: boom", protocol="")
    cur = pd.concat([base[~gone], to_frame([crash])], ignore_index=True)
    reg = compare(base, cur).regressions
    assert set(reg["metric"]) == {"perplexity", "worst_group_acc", "effective_bits"}
    assert set(reg["change"]) == {"missing in current"}


def test_tighter_tolerance_on_cli(tmp_path, capsys):
    base = write(results(), tmp_path / "base")
    cur = results()
    cur.loc[cur["metric"] == "perplexity", "value"] *= 1.01  # +1%: fine at 2%, a regression at 0.5%
    cur = write(cur, tmp_path / "cur")
    args = ["--baseline", str(base), "--current", str(cur), "--out", str(tmp_path / "p.html"), "--no-plots"]
    assert main(args) == 0
    assert main(args + ["--rtol-ppl", "0.005"]) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "corrupted", "other_model", "other_protocol"])
def test_bad_inputs_exit_2_naming_the_file(tmp_path, capsys, case):
    base = write(results(), tmp_path / "base")
    cur = tmp_path / "cur"
    named = str(cur)
    if case == "empty":
        cur.mkdir()
    elif case == "corrupted":
        write(results(), cur)
        bad = cur / "cells" / "rtn-w4g64-none-None.parquet"
        bad.write_bytes(b"PAR1 this is not parquet")
        named = str(bad)
    elif case == "other_model":
        write(results(model="other-lm"), cur)
    elif case == "other_protocol":
        df = results()
        df.loc[df["metric"] == "perplexity", "protocol"] = PPL.replace("seq_len=512", "seq_len=2048")
        write(df, cur)
        named = str(cur / "cells")
    assert main(["--baseline", str(base), "--current", str(cur), "--out", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and len(err.strip().splitlines()) == 1, err
    if case == "other_protocol":
        assert "seq_len=2048" in err and "seq_len=512" in err and str(base / "cells") in err
    assert not (tmp_path / "p.html").exists()


def test_bad_input_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ptqbench.dashboard", "--baseline", str(tmp_path / "a"),
                        "--current", str(tmp_path / "b")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and str(tmp_path / "a") in p.stderr


def test_page_in_headless_chromium(regressed, tmp_path):
    """The page as a browser renders it from disk: the regression row is in the DOM; a screenshot is kept."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/ensure_chromium.sh (Debian's chromium package)")
    _, page, _ = regressed
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    url = page.resolve().as_uri()
    subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'profile1'}", f"--screenshot={shot}",
                    "--window-size=1280,2000", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'id="verdict"' in dom and "FAIL: 1 metric(s) regressed" in dom
    regression_rows = [r for r in dom.split("<tr") if r.startswith(' class="regression"')]
    # the same row appears in the Regressions table and the all-metrics table
    assert len(regression_rows) == 2
    row = regression_rows[0]
    for text in ("gptq", "w3g64", "perplexity", "26.1", "28.71", "+10.00%", "regression"):
        assert text in row, f"{text!r} not in the regression row: {row}"
    assert dom.count('src="data:image/png;base64,') >= 2
    assert shot.exists() and shot.stat().st_size > 50_000
    with shot.open("rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 1280
