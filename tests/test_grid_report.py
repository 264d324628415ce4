"""Transform x rounding grids on a small hand-made results table: best range per entry, best entry, references,
protocol refusal, old results without stage columns, and the ``report --grid`` command line."""

from __future__ import annotations

import pandas as pd
import pytest

from ptqbench.errors import ConfigError
from ptqbench.grid_report import grid_tables, render_grid, write_grids
from ptqbench.report import main
from ptqbench.results import ResultsError, to_frame, write_cell
from ptqbench.tables import ProtocolMismatchError

PPL = "ppl:concat-windows;split=eval;seq_len=512;windows=40;tokens=20480"
STAGES = {"fp16": ("", "", ""), "rtn": ("none", "minmax", "nearest"), "gptq": ("none", "minmax", "gptq"),
          "awq": ("awq", "clip", "nearest"), "hqq": ("none", "hqq", "nearest")}


def cell(method: str, quant: str, ppl: dict[str, float], seed: int | None = None, calib: str = "docs",
         status: str = "ok", stages: bool = True) -> list[dict]:
    """The perplexity rows of one cell; its stages from STAGES (aliases) or the ``t+r+q`` name itself."""
    t, r, q = STAGES.get(method) or method.split("+")
    base = dict(model="tiny-lm", method=method, family="x", quant=quant, w_bits=16 if quant == "fp16" else 3,
                a_bits=16, group_size=64, sym=False, calib="none" if method in ("fp16", "rtn", "hqq") else calib,
                seed=seed, config_hash=f"{method}-{quant}-{calib}-{seed}", group="", metric="perplexity",
                status=status, protocol=PPL)
    if stages:
        base.update(transform=t, range=r, rounding=q)
    return [dict(base, dataset=ds, value=v) for ds, v in ppl.items()]


def results(stages: bool = True) -> pd.DataFrame:
    rows = cell("fp16", "fp16", {"docs": 16.05, "code": 9.0}, stages=stages)
    rows += cell("rtn", "w3g64", {"docs": 48.4, "code": 30.0}, stages=stages)
    rows += cell("hqq", "w3g64", {"docs": 40.0, "code": 31.0}, stages=stages)  # none x nearest: hqq beats minmax
    rows += cell("gptq", "w3g64", {"docs": 30.0, "code": 18.0}, seed=0, stages=stages)
    rows += cell("gptq", "w3g64", {"docs": 32.0, "code": 19.0}, seed=1, stages=stages)  # two seeds: mean 31
    rows += cell("awq", "w3g64", {"docs": 26.0, "code": 17.5}, seed=0, stages=stages)
    rows += cell("awq+minmax+nearest", "w3g64", {"docs": 24.31, "code": 17.9}, seed=0, stages=stages)
    rows += cell("awq+clip+gptq", "w3g64", {"docs": 25.5, "code": 16.0}, seed=0, stages=stages)
    rows += cell("quarot+minmax+gptq", "w3g64", {"docs": float("nan"), "code": float("nan")}, seed=0,
                 status="diverged", stages=stages)
    return to_frame(rows)


def grid(df: pd.DataFrame, dataset: str = "docs"):
    return next(t for t in grid_tables(df) if t.dataset == dataset and t.quant == "w3g64")


def md_cells(md: str) -> dict[str, list[str]]:
    """The markdown table as {transform: [entries by rounding]}, plus the header row under 'header'."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|") and not set(ln) <= set("|-: ")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {"header": rows[0][1:], **{r[0]: r[1:] for r in rows[1:]}}


def test_best_range_per_entry_and_best_entry():
    t = grid(results())
    assert t.transforms == ["none", "awq", "quarot"] and t.roundings == ["nearest", "gptq"]
    md = render_grid(t, "md")
    rows = md_cells(md)
    assert rows["header"] == ["nearest", "gptq"]
    # none x nearest: hqq (40.00) beats minmax (48.40); awq x nearest: minmax (24.31) beats clip (26.00), the best
    assert rows["none"] == ["40.00 (hqq)", "31.00 (minmax)"]
    assert rows["awq"] == ["**24.31 (minmax)**", "25.50 (clip)"]
    assert rows["quarot"] == ["–", "diverged"]
    assert t.cell("awq", "nearest").best and not t.cell("awq", "gptq").best
    assert sum(c.best for c in t.cells.values()) == 1


def test_best_entry_per_dataset():
    rows = md_cells(render_grid(grid(results(), "code"), "md"))
    assert rows["awq"] == ["17.50 (clip)", "**16.00 (clip)**"] and rows["none"] == ["30.00 (minmax)", "18.50 (minmax)"]


def test_references_and_caption():
    t = grid(results())
    assert t.fp16.mean == pytest.approx(16.05) and t.rtn.mean == pytest.approx(48.4)
    md = render_grid(t, "md")
    caption = next(ln for ln in md.splitlines() if ln.startswith("Table: "))
    assert "tiny-lm, w3g64, perplexity on docs, calibrated on docs" in caption
    assert "References: fp16 16.05; RTN (none+minmax+nearest) 48.40." in caption
    assert "mean over seeds (n = 2)" in caption
    assert f"- PPL protocol: {PPL}" in md
    no_fp16 = render_grid(grid(results().query("method != 'fp16'")), "md")
    assert "References: fp16 not measured; RTN (none+minmax+nearest) 48.40." in no_fp16


def test_latex_marks_best_with_textbf():
    tex = render_grid(grid(results()), "latex")
    assert r"\textbf{24.31 (minmax)}" in tex and "25.50 (clip)" in tex
    assert r"\toprule" in tex and r"\caption[" in tex and "RTN (none+minmax+nearest) 48.40" in tex
    assert r"awq & \textbf{24.31 (minmax)} & 25.50 (clip) \\" in tex


def test_mixed_protocols_are_refused():
    df = results()
    df.loc[df["method"] == "fp16", "protocol"] = PPL.replace("seq_len=512", "seq_len=2048")
    with pytest.raises(ProtocolMismatchError) as e:
        grid_tables(df)
    msg = str(e.value)
    assert "'w3g64 · PPL " in msg and "seq_len=2048" in msg and "seq_len=512" in msg and "fp16" in msg


def test_same_seed_twice_is_refused():
    df = results()
    extra = df[df["method"] == "awq"].assign(config_hash="awq-other-hparams")
    with pytest.raises(ResultsError, match="same seed"):
        grid_tables(pd.concat([df, extra], ignore_index=True))


def test_failed_cell_shows_as_failed():
    crash = dict(cell("smoothquant+minmax+gptq", "w3g64", {"": float("nan")}, seed=0, status="failed")[0],
                 metric="cell", protocol="", error="RuntimeError: Cholesky failed")
    t = grid(pd.concat([results(), to_frame([crash])], ignore_index=True))
    assert t.transforms == ["none", "smoothquant", "awq", "quarot"]
    assert md_cells(render_grid(t, "md"))["smoothquant"] == ["–", "failed"]
    assert "failed: smoothquant+minmax+gptq (calib docs): RuntimeError: Cholesky failed" in t.notes


def test_old_results_without_stage_columns_are_placed_by_name():
    df = results(stages=False)
    assert not {"transform", "range", "rounding"} & set(df.columns)
    t = grid(df)
    assert t.cell("none", "gptq").range == "minmax" and t.cell("none", "gptq").mean == pytest.approx(31.0)
    assert t.cell("awq", "nearest").range == "minmax" and t.cell("awq", "nearest").best
    assert md_cells(render_grid(t, "md"))["none"] == ["40.00 (hqq)", "31.00 (minmax)"]
    # a mix of old (no stages) and new rows reads alike
    mixed = pd.concat([results(stages=False).query("method != 'gptq'"), results().query("method == 'gptq'")],
                      ignore_index=True)
    assert render_grid(grid(mixed), "md") == render_grid(t, "md")


def test_several_calibration_sources_get_a_grid_each():
    extra = to_frame(cell("gptq", "w3g64", {"docs": 35.0}, seed=0, calib="code"))
    tables = [t for t in grid_tables(pd.concat([results(), extra], ignore_index=True)) if t.dataset == "docs"]
    assert [t.calib for t in tables] == ["code", "docs"]
    code = tables[0]
    assert code.cell("none", "gptq").mean == 35.0 and code.rtn.mean == pytest.approx(48.4)  # RTN in both
    assert code.transforms == ["none"]


def _write(df: pd.DataFrame, root):
    for h, g in df.groupby("config_hash"):
        write_cell(root, h, g.to_dict("records"))


def test_cli_prints_grid(tmp_path, capsys):
    _write(results(), tmp_path / "res")
    assert main([str(tmp_path / "res"), "--grid"]) == 0
    out = capsys.readouterr().out
    assert "### tiny-lm · w3g64 · PPL docs · calib docs" in out and "### tiny-lm · w3g64 · PPL code" in out
    docs = out[out.index("### tiny-lm · w3g64 · PPL docs"):]
    assert md_cells(docs)["awq"] == ["**24.31 (minmax)**", "25.50 (clip)"]
    assert "References: fp16 16.05; RTN (none+minmax+nearest) 48.40." in out


def test_cli_writes_grid_files(tmp_path, capsys):
    _write(results(), tmp_path / "res")
    assert main([str(tmp_path / "res"), "--grid", "--format", "latex", "--out", str(tmp_path / "rep")]) == 0
    tex = (tmp_path / "rep" / "grid_tiny-lm_w3g64.tex").read_text()
    assert tex.count(r"\begin{table}") == 2 and r"\textbf{16.00 (clip)}" in tex
    assert capsys.readouterr().out.strip() == str(tmp_path / "rep" / "grid_tiny-lm_w3g64.tex")
    with pytest.raises(ConfigError, match="no 'csv' format"):
        write_grids(results(), tmp_path / "rep", "csv")
    assert main([str(tmp_path / "res"), "--grid", "--format", "csv"]) == 2
    assert "error: the grid has no 'csv' format" in capsys.readouterr().err


def test_cli_without_recipe_rows_is_exit_2(tmp_path, capsys):
    _write(to_frame(cell("fp16", "fp16", {"docs": 16.05})), tmp_path / "res")
    assert main([str(tmp_path / "res"), "--grid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no perplexity of a recipe" in err and len(err.strip().splitlines()) == 1
