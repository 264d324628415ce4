"""Leaderboard tables on a small hand-made results table: exact cells, best markers, CIs, protocol checks, CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ptqbench.report import direction, format_value, leaderboard, main, mean_ci, render
from ptqbench.results import ResultsError, to_frame, write_cell
from ptqbench.tables import ProtocolMismatchError

PPL = "ppl:concat-windows;split=eval;seq_len=512;windows=40;tokens=20480"
ACC = "acc:worst-group;task=domains"
BITS = "bits:weights+scales+zeros"
ROOT = Path(__file__).resolve().parent.parent


def cell(method: str, family: str, quant: str, w_bits: int | None, calib: str, seed: int | None,
         ppl_docs: float, wga: float | None = None, bits: float | None = None, status: str = "ok") -> list[dict]:
    """The rows of one cell (perplexity on docs, optionally worst-group accuracy and effective bits)."""
    h = f"{method}-{quant}-{calib}-{seed}"
    base = dict(model="tiny-lm", method=method, family=family, quant=quant, w_bits=w_bits, a_bits=16, group_size=64,
                sym=False, calib=calib, calib_n=None if calib == "none" else 128,
                calib_seqlen=None if calib == "none" else 512, seed=seed,
                calib_fingerprint="" if calib == "none" else f"{seed}fp0123456789", config_hash=h, group="",
                status="ok")
    rows = [dict(base, metric="perplexity", dataset="docs", value=ppl_docs, protocol=PPL, status=status)]
    if wga is not None:
        rows.append(dict(base, metric="worst_group_acc", dataset="domains", value=wga, protocol=ACC))
    if bits is not None:
        rows.append(dict(base, metric="effective_bits", dataset="", value=bits, protocol=BITS))
    return rows


def results() -> pd.DataFrame:
    rows = cell("fp16", "baseline", "fp16", 16, "none", None, 16.05, 50.0, 16.0)
    rows += cell("rtn", "calibration-free", "w4g64", 4, "none", None, 21.1, 40.0, 4.5)
    rows += cell("rtn", "calibration-free", "w3g64", 3, "none", None, 48.4, 30.0, 3.5)
    for seed, ppl, acc in [(0, 10.0, 44.0), (1, 12.0, 45.0), (2, 14.0, 46.0)]:  # replicates: mean 12, sd 2
        rows += cell("gptq", "compensation", "w4g64", 4, "docs", seed, ppl, acc, 4.5)
    rows += cell("gptq", "compensation", "w3g64", 3, "docs", 0, 30.0, 35.0, 3.5)
    rows += cell("awq", "salience/scaling", "w4g64", 4, "docs", 0, 19.0, 46.5, 4.5)
    rows += cell("awq", "salience/scaling", "w3g64", 3, "docs", 0, float("nan"), status="diverged")
    return to_frame(rows)


def test_ci_on_known_numbers():
    mean, half = mean_ci([10.0, 12.0, 14.0])
    # t(0.975, df=2) = 4.302652729911275; sd = 2; n = 3
    assert mean == 12.0 and half == pytest.approx(4.302652729911275 * 2 / math.sqrt(3))
    assert format_value(mean, half) == "12.00 ± 4.97"
    assert format_value(21.1) == "21.10"
    assert format_value(4.1e5, 2.0e4) == "4.10e+05 ± 2.00e+04"  # diverged-scale values stay readable
    assert math.isnan(mean_ci([3.0])[1])


def test_directions():
    assert direction("perplexity") == -1 and direction("latency_us") == -1 and direction("effective_bits") == -1
    assert direction("worst_group_acc") == 1 and direction("mean_acc") == 1
    assert direction("something_else") == 0


def test_table_cells_markers_and_order():
    t = leaderboard(results())["tiny-lm"]
    # rows grouped by taxonomy family, in taxonomy order
    assert [r[:2] for r in t.rows] == [("baseline", "fp16"), ("calibration-free", "rtn"), ("compensation", "gptq"),
                                       ("salience/scaling", "awq")]
    # columns: schemes from most to fewest bits, metrics in leaderboard order
    labels = [c.label() for c in t.columns]
    assert labels[:3] == ["fp16 · PPL docs ↓", "fp16 · worst-group acc domains ↑", "fp16 · eff. bits ↓"]
    assert labels[3:6] == ["w4g64 · PPL docs ↓", "w4g64 · worst-group acc domains ↑", "w4g64 · eff. bits ↓"]
    md = render(t, "md")
    lines = {ln.split("|")[2].strip() + "/" + ln.split("|")[3].strip(): [c.strip() for c in ln.split("|")[4:-1]]
             for ln in md.splitlines() if ln.startswith("|") and "---" not in ln and "method" not in ln}
    w4_ppl, w4_acc, w3_ppl = labels.index("w4g64 · PPL docs ↓"), labels.index(
        "w4g64 · worst-group acc domains ↑"), labels.index("w3g64 · PPL docs ↓")
    # lower perplexity wins; the seed replicates show mean ± 95% CI
    assert lines["gptq/docs"][w4_ppl] == "**12.00 ± 4.97**"
    assert lines["rtn/none"][w4_ppl] == "21.10" and lines["awq/docs"][w4_ppl] == "19.00"
    # higher accuracy wins: awq's 46.5 beats gptq's 45.00 ± 2.48
    assert lines["awq/docs"][w4_acc] == "**46.50**" and lines["gptq/docs"][w4_acc] == "45.00 ± 2.48"
    # a diverged cell says so and never wins
    assert lines["awq/docs"][w3_ppl] == "diverged" and lines["gptq/docs"][w3_ppl] == "**30.00**"
    # a lone value (the fp16 baseline's column) is not marked; absent entries show a dash
    assert lines["fp16/none"][0] == "16.05" and lines["fp16/none"][w4_ppl] == "–"
    # ties are all marked (every w4g64 method packs 4.5 bits)
    assert lines["rtn/none"][labels.index("w4g64 · eff. bits ↓")] == "**4.50**"


def test_protocol_and_calibration_in_notes():
    t = leaderboard(results())["tiny-lm"]
    md, tex = render(t, "md"), render(t, "latex")
    assert f"PPL docs: {PPL}" in md and f"worst-group acc domains: {ACC}" in md
    assert "docs (128 windows of 512 tokens; fingerprints 0fp01234, 1fp01234, 2fp01234)" in md
    assert "Student t; n = 3" in md
    assert "seq\\_len=512" in tex  # protocol in the LaTeX caption, escaped


def test_protocol_per_scheme_when_schemes_differ():
    df = results()
    df.loc[(df["metric"] == "effective_bits") & (df["quant"] == "w3g64"), "protocol"] = "bits:v2"
    notes = leaderboard(df)["tiny-lm"].notes  # one protocol per column is fine; the notes say which is which
    assert "eff. bits (w3g64): bits:v2" in notes and f"eff. bits (fp16, w4g64): {BITS}" in notes


def test_latex_booktabs_and_bold():
    tex = render(leaderboard(results())["tiny-lm"], "latex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption[", r"\label{tab:tiny-lm}"):
        assert rule in tex
    assert r"\cline" not in tex  # booktabs rules only
    assert r"\textbf{12.00 $\pm$ 4.97}" in tex
    assert r"\multicolumn{3}{c}{w4g64}" in tex
    assert "salience/scaling & awq & docs" in tex
    # a \midrule between families: 4 families -> the header rule plus 3
    assert tex.count(r"\midrule") == 4


def test_csv_is_numeric():
    from io import StringIO

    csv = pd.read_csv(StringIO(render(leaderboard(results())["tiny-lm"], "csv")))
    g = csv[(csv["method"] == "gptq") & (csv["quant"] == "w4g64") & (csv["metric"] == "perplexity")].iloc[0]
    assert g["mean"] == 12.0 and g["n"] == 3 and bool(g["best"])
    assert g["ci95_half"] == pytest.approx(4.9682754)


def test_mixed_protocols_in_one_column_are_refused():
    df = results()
    df.loc[(df["method"] == "awq") & (df["quant"] == "w4g64") & (df["metric"] == "perplexity"), "protocol"] = \
        PPL.replace("seq_len=512", "seq_len=2048")
    with pytest.raises(ProtocolMismatchError) as e:
        leaderboard(df)
    msg = str(e.value)
    assert "'w4g64 · PPL docs ↓'" in msg and "seq_len=2048" in msg and "seq_len=512" in msg and "awq" in msg


def test_same_seed_twice_in_one_entry_is_refused():
    df = results()
    extra = df[(df["method"] == "awq") & (df["quant"] == "w4g64")].assign(config_hash="awq-other-hparams")
    with pytest.raises(ResultsError, match="same seed"):
        leaderboard(pd.concat([df, extra], ignore_index=True))


def test_failed_cell_shows_as_failed():
    df = results()
    crash = dict(df.iloc[0].to_dict(), method="quip", family="rotation", quant="w3g64", w_bits=3, calib="docs",
                 seed=0, config_hash="quip-crash", metric="cell", dataset="", value=float("nan"), status="failed",
                 error="RuntimeError: Cholesky failed", protocol="")
    t = leaderboard(pd.concat([df, to_frame([crash])], ignore_index=True))["tiny-lm"]
    row = t.find_row("quip")
    cols = [c for c in t.columns if c.quant == "w3g64"]
    assert [t.cell(row, c).text() for c in cols] == ["failed"] * len(cols)
    assert "failed: quip w3g64 (calib docs): RuntimeError: Cholesky failed" in t.notes


def test_one_table_per_model():
    df = results()
    other = df.assign(model="other-lm")
    tables = leaderboard(pd.concat([df, other], ignore_index=True))
    assert sorted(tables) == ["other-lm", "tiny-lm"]


def test_cli_writes_files(tmp_path, capsys):
    df = results()
    for h, g in df.groupby("config_hash"):
        write_cell(tmp_path / "res", h, g.to_dict("records"))
    out = tmp_path / "report"
    assert main([str(tmp_path / "res"), "--format", "latex", "--out", str(out), "--no-plots"]) == 0
    assert (out / "leaderboard_tiny-lm.tex").read_text().startswith(r"\begin{table}")
    assert main([str(tmp_path / "res"), "--format", "md"]) == 0
    assert "**12.00 ± 4.97**" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nowhere"
    p = subprocess.run([sys.executable, "-m", "ptqbench.report", str(missing)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and str(missing) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_corrupted_file_named(tmp_path, capsys):
    bad = tmp_path / "res" / "cells" / "deadbeef.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a parquet file")
    assert main([str(tmp_path / "res")]) == 2
    assert str(bad) in capsys.readouterr().err


def test_latency_rows_of_weight_activation_cells_stay_apart():
    """W4A8 and W4A4 cells of one method share a weight format: their latency rows carry the cell's scheme (and say
    the kernel is A16), so the leaderboard gets one column per scheme instead of a clash."""
    from types import SimpleNamespace

    from ptqbench.evaluators import CellContext
    from ptqbench.evaluators.latency import latency
    from ptqbench.scheme import QuantScheme

    rows = []
    for a_bits in (8, 4):
        scheme = QuantScheme(w_bits=4, group_size=-1, a_bits=a_bits)
        ctx = CellContext(model=None, tokenizer=None, tokenizer_id="", model_name="tiny-lm", device="cpu",
                          result=SimpleNamespace(layers={"l0.q": SimpleNamespace(shape=(64, 128))}), scheme=scheme,
                          is_baseline=False, seed=0)
        got = latency(ctx, {"standard_shapes": False, "batches": [1]})
        assert {r["quant"] for r in got} == {scheme.label} and {r["a_bits"] for r in got} == {a_bits}
        assert all(f"kernel W4xA16: the scheme's A{a_bits} is not fused" in r["protocol"] for r in got)
        base = dict(model="tiny-lm", method="quarot", family="rotation", w_bits=4, group_size=-1, sym=False,
                    calib="docs", calib_n=32, calib_seqlen=512, seed=0, calib_fingerprint="fp",
                    config_hash=f"quarot-{a_bits}")
        rows += [dict(base, **r) for r in got]
        rows.append(dict(base, quant=scheme.label, a_bits=a_bits, metric="perplexity", dataset="docs", group="",
                         value=10.0 + a_bits, protocol=PPL, status="ok"))
    assert {r["quant"] for r in rows} == {"w4a8c", "w4a4c"}
    table = leaderboard(to_frame(rows))["tiny-lm"]  # raised "... fill the same cell" before the fix
    assert "w4a8c" in render(table) and "w4a4c" in render(table)
