"""Leaderboard tables from the results store (markdown, LaTeX or csv), and the plots beside them.

``python -m ptqbench.report <results dir> [--format md|latex|csv] [--out DIR] [--no-plots]``
``python -m ptqbench.report <results dir> --grid [--format md|latex] [--out DIR]``: transform x rounding grids of the
recipe results instead (``ptqbench.grid_report``).

One table per model: rows are methods grouped by taxonomy family (and their calibration source), columns are
bit-width schemes x metrics. Seed replicates (cells that differ only in the seed) are shown as mean +- the 95%
confidence half-width (Student t). The best value of each column is bold. Values measured under different
protocols are never put in one column: building such a table is an error that names the column.

The pure part is importable: ``leaderboard(df) -> {model: Table}`` and ``render(table, fmt) -> str``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ptqbench.errors import ConfigError
from ptqbench.grid_report import grid_tables, render_grid, write_grids
from ptqbench.results import ResultsError, load_results
from ptqbench.tables import (ProtocolMismatchError, check_protocol, format_number, latex_escape, prepare,
                             scheme_bits, slug)

# Taxonomy order of the rows; families not listed here come after, alphabetically.
FAMILY_ORDER = ("baseline", "calibration-free", "compensation", "salience/scaling", "rotation", "reordering",
                "optimization", "binarization")
# Metrics a leaderboard shows by default, in column order within a scheme.
DEFAULT_METRICS = ("perplexity", "worst_group_acc", "mean_acc", "effective_bits", "latency_us")
METRIC_LABELS = {
    "perplexity": "PPL", "worst_group_acc": "worst-group acc", "mean_acc": "mean acc", "acc": "acc",
    "effective_bits": "eff. bits", "latency_us": "latency (us)", "quant_time_s": "quant time (s)",
    "peak_host_mem_gib": "peak mem (GiB)",
}
LOWER_IS_BETTER = {"perplexity", "effective_bits", "latency_us", "quant_time_s", "peak_host_mem_gib", "acc_gap"}
HIGHER_IS_BETTER = {"worst_group_acc", "mean_acc", "acc"}


def direction(metric: str) -> int:
    """-1 when lower is better, +1 when higher is better, 0 when unknown (no best marker)."""
    if metric in LOWER_IS_BETTER or metric.startswith("latency") or metric.endswith(("_s", "_gib", "_us", "_gap")):
        return -1
    if metric in HIGHER_IS_BETTER or metric.endswith("_acc") or metric.startswith("acc"):
        return 1
    return 0


def mean_ci(values: list[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided confidence interval (Student t; NaN for fewer than 2 values)."""
    from scipy import stats  # imported here: scipy is slow to import and only replicates need it

    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) < 2:
        return float(v[0]), math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


def format_value(mean: float, half: float | None = None, pm: str = "±") -> str:
    """``12.00 ± 4.97`` (CI half-width at the mean's precision), or just ``12.00`` without a CI."""
    if half is None or not math.isfinite(half):
        return format_number(mean)
    return f"{format_number(mean)} {pm} {format_number(half, like=mean)}"


@dataclass(frozen=True)
class Column:
    """One table column: a bit-width scheme x a (metric, dataset, group)."""

    quant: str
    metric: str
    dataset: str
    group: str

    def metric_label(self, fmt: str = "md") -> str:
        arrow = {-1: "↓", 1: "↑"}.get(direction(self.metric), "")
        if fmt == "latex":
            arrow = {-1: r"$\downarrow$", 1: r"$\uparrow$"}.get(direction(self.metric), "")
        name = METRIC_LABELS.get(self.metric, self.metric)
        parts = [name] + [p for p in (self.dataset, self.group) if p]
        text = " ".join(parts)
        if fmt == "latex":
            text = latex_escape(text)
        return f"{text} {arrow}".strip()

    def label(self) -> str:
        return f"{self.quant} · {self.metric_label()}"


@dataclass
class Cell:
    """One table entry: the aggregate over seed replicates."""

    mean: float = math.nan
    half: float = math.nan  # 95% CI half-width; NaN without replicates
    n: int = 0  # cells (seeds) behind the entry
    n_ok: int = 0  # of which measured fine
    status: str = ""  # ok, or the status when nothing was measured (failed / diverged / skipped)
    best: bool = False

    @property
    def has_value(self) -> bool:
        return self.n_ok > 0 and math.isfinite(self.mean)

    def text(self, pm: str = "±") -> str:
        if self.n == 0:
            return "–"
        if not self.has_value:
            return {"skipped": "n/a"}.get(self.status, self.status or "–")
        s = format_value(self.mean, self.half, pm)
        return s if self.n_ok == self.n else f"{s} ({self.n_ok}/{self.n} ok)"


Row = tuple[str, str, str]  # (family, method, calibration label)


@dataclass
class Table:
    """A leaderboard for one model: ordered rows and columns, their entries, and the notes that go with them."""

    model: str
    rows: list[Row]
    columns: list[Column]
    cells: dict[tuple[Row, Column], Cell]
    caption: str
    notes: list[str] = field(default_factory=list)

    def cell(self, row: Row, col: Column) -> Cell:
        return self.cells.get((row, col), Cell())

    def find_row(self, method: str, calib: str | None = None) -> Row:
        """The row of a method (and calibration label); for tests and scripts."""
        hits = [r for r in self.rows if r[1] == method and (calib is None or r[2] == calib)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} rows for method={method!r} calib={calib!r}")
        return hits[0]


def _family_key(family: str) -> tuple[int, str]:
    return (FAMILY_ORDER.index(family), "") if family in FAMILY_ORDER else (len(FAMILY_ORDER), family)


def _scheme_order(d: pd.DataFrame) -> list[str]:
    """Schemes from most to fewest bits (weights, then activations), then by group size."""
    keys = {}
    for quant, g in d.groupby("quant", sort=False):
        r = g.iloc[0]
        ab = r["a_bits"] if pd.notna(r["a_bits"]) else 16
        gs = r["group_size"] if pd.notna(r["group_size"]) else 0
        keys[quant] = (-np.nan_to_num(scheme_bits(r), nan=16.0), -ab, gs, quant)
    return sorted(keys, key=keys.get)


def _calib_labels(d: pd.DataFrame) -> pd.Series:
    """Calibration label per row: the source name, plus n x seqlen where a method uses several sizes."""
    sizes = d.groupby(["method", "calib"])[["calib_n", "calib_seqlen"]].transform(lambda s: s.nunique(dropna=False))
    varies = (sizes.max(axis=1) > 1) & (d["calib"] != "none")

    def fmt(x: float) -> str:
        return "?" if pd.isna(x) else str(int(x))

    label = d["calib"].copy()
    label[varies] = [f"{c} ({fmt(n)}x{fmt(s)})" for c, n, s in
                     zip(d.loc[varies, "calib"], d.loc[varies, "calib_n"], d.loc[varies, "calib_seqlen"])]
    return label


def _check_protocols(d: pd.DataFrame, model: str) -> None:
    """One protocol per column, or a ProtocolMismatchError that names the column and the protocols."""
    measured = d[d["protocol"] != ""]
    for (quant, metric, dataset, group), g in measured.groupby(["quant", "metric", "dataset", "group"]):
        check_protocol(g, f"model {model}, column '{Column(quant, metric, dataset, group).label()}'")


def _aggregate(g: pd.DataFrame, row: Row, col: Column) -> Cell:
    """Aggregate one entry's rows, refusing two cells with the same seed (a setting the table does not show)."""
    per_cell = g.drop_duplicates("config_hash")
    if len(per_cell) < len(g):
        raise ResultsError(f"cell {g['config_hash'].iloc[0]} has several rows for column '{col.label()}'")
    seeds = per_cell["seed"].fillna(-1)
    if seeds.duplicated().any():
        dup = per_cell[seeds.duplicated(keep=False)]["config_hash"].tolist()
        raise ResultsError(
            f"cells {', '.join(dup)} all fill row {row[1]} ({row[2]}), column '{col.label()}' with the same seed: "
            "they differ in a setting the table does not show; filter the results first")
    ok = per_cell[(per_cell["status"] == "ok") & np.isfinite(per_cell["value"])]
    mean, half = mean_ci(ok["value"].to_numpy())
    if len(ok):
        status = "ok"
    else:  # the most telling status among the replicates
        statuses = set(per_cell["status"])
        status = next((s for s in ("failed", "diverged", "skipped") if s in statuses), "ok")
        if status == "ok":
            status = "diverged"  # status ok with a NaN/inf value
    return Cell(mean=mean, half=half, n=len(per_cell), n_ok=len(ok), status=status)


def _mark_best(cells: dict[tuple[Row, Column], Cell], columns: list[Column]) -> None:
    for col in columns:
        sign = direction(col.metric)
        entries = [c for (r, cc), c in cells.items() if cc == col and c.has_value]
        if sign == 0 or len(entries) < 2:  # a lone value is not "best" of anything
            continue
        best = max(sign * c.mean for c in entries)
        for c in entries:
            c.best = bool(np.isclose(sign * c.mean, best, rtol=1e-12, atol=0.0))


def _notes(d: pd.DataFrame, columns: list[Column], cells: dict) -> list[str]:
    """Protocol, calibration and replicate notes: what a reader needs to reproduce or compare the numbers."""
    notes = []
    shown = {(c.metric, c.dataset, c.group) for c in columns}
    measured = d[d["protocol"] != ""]
    keep = [(m, ds, g) in shown for m, ds, g in zip(measured["metric"], measured["dataset"], measured["group"])]
    measured = measured[np.array(keep, dtype=bool)]
    where = measured["dataset"] + " " + measured["group"]
    mixed = measured.groupby([measured["metric"], where])["protocol"].transform("nunique") > 1  # differs by scheme
    for metric, g in measured.groupby("metric"):
        name = METRIC_LABELS.get(metric, metric)
        # datasets measured under the same protocol share one note: "PPL code, docs: <protocol>"
        for proto, gp in g[~mixed.loc[g.index]].groupby("protocol"):
            places = sorted({w.strip() for w in where.loc[gp.index]} - {""})
            notes.append(f"{' '.join([name] + ([', '.join(places)] if places else []))}: {proto}")
        for (w, proto), gp in g[mixed.loc[g.index]].groupby([where.loc[g.index], "protocol"]):
            notes.append(f"{name} {w.strip()} ({', '.join(sorted(set(gp['quant'])))}): {proto}".replace("  ", " "))
    calib = []
    for name, g in d.groupby("calib"):
        if name == "none":
            continue
        n = sorted({int(x) for x in g["calib_n"].dropna()})
        sl = sorted({int(x) for x in g["calib_seqlen"].dropna()})
        fps = sorted({f[:8] for f in g["calib_fingerprint"] if f})
        size = f"{'/'.join(map(str, n)) or '?'} windows of {'/'.join(map(str, sl)) or '?'} tokens"
        calib.append(f"{name} ({size}; fingerprint{'s' if len(fps) != 1 else ''} {', '.join(fps) or 'unrecorded'})")
    if calib:
        notes.append("Calibration: " + "; ".join(calib) + "; 'none' = calibration-free")
    ns = sorted({c.n_ok for c in cells.values() if c.n_ok > 1})
    if ns:
        notes.append(f"± = 95% CI half-width of the mean over seeds (Student t; n = {', '.join(map(str, ns))})")
    return notes


def _expand_failed(failed: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """A failed cell's single row, copied into every (metric, dataset, group) the table shows, so that its
    entries read "failed" instead of silently missing."""
    keys = measured.loc[measured["status"] != "skipped", ["metric", "dataset", "group"]].drop_duplicates()
    if failed.empty or keys.empty:
        return failed.iloc[0:0]
    return failed.drop(columns=["metric", "dataset", "group"]).merge(keys, how="cross")


def leaderboard(df: pd.DataFrame, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS) -> dict[str, Table]:
    """Build one leaderboard per model from a results table (rows of the results store)."""
    d = prepare(df)
    failed = d[(d["metric"] == "cell") & (d["status"] == "failed")]  # a cell that raised: one row, no metrics
    d = d[d["metric"].isin(metrics)]
    if d.empty:
        raise ResultsError(f"the results hold none of the metrics {list(metrics)}"
                           + (f" ({failed['config_hash'].nunique()} cell(s) failed)" if len(failed) else ""))
    tables = {}
    for model, m in d.groupby("model", sort=True):
        m = pd.concat([m, _expand_failed(failed[failed["model"] == model], m)], ignore_index=True)
        m = m.assign(calib_label=_calib_labels(m))
        _check_protocols(m, str(model))
        rows = sorted({(f, me, c) for f, me, c in zip(m["family"], m["method"], m["calib_label"])},
                      key=lambda r: (_family_key(r[0]), r[1], r[2] != "none", r[2]))
        metric_rank = {mt: i for i, mt in enumerate(metrics)}
        col_keys = {(q, mt, ds, gr) for q, mt, ds, gr in zip(m["quant"], m["metric"], m["dataset"], m["group"])}
        scheme_rank = {q: i for i, q in enumerate(_scheme_order(m))}
        order = sorted(col_keys, key=lambda k: (scheme_rank[k[0]], metric_rank[k[1]], k[2], k[3]))
        columns = [Column(*k) for k in order]
        cells: dict[tuple[Row, Column], Cell] = {}
        for key, g in m.groupby(["family", "method", "calib_label", "quant", "metric", "dataset", "group"]):
            row, col = key[:3], Column(*key[3:])
            cells[(row, col)] = _aggregate(g, row, col)
        # a column where nothing was measured at all (e.g. latency without a GPU) says nothing: drop it
        columns = [c for c in columns
                   if any(cl.status != "skipped" for (r, cc), cl in cells.items() if cc == c)]
        _mark_best(cells, columns)
        caption = (f"Post-training quantization of {model}. Rows: methods by family and calibration set; "
                   "columns: bit-width scheme x metric (↓ lower is better, ↑ higher is better); best per column "
                   "in bold.")
        notes = _notes(m, columns, cells)
        for r in failed[failed["model"] == model].itertuples(index=False):
            why = r.error[:120] or "no error recorded"
            notes.append(f"failed: {r.method} {r.quant} (calib {r.calib}): {why}")
        tables[str(model)] = Table(str(model), rows, columns, cells, caption, notes)
    return tables


# --- rendering ---------------------------------------------------------------------------------------------------

def _display_frame(table: Table, fmt: str) -> pd.DataFrame:
    """The table as strings, best values emphasised in the target format."""
    records = []
    for row in table.rows:
        rec = {}
        for col in table.columns:
            cell = table.cell(row, col)
            if fmt == "latex":
                txt = latex_escape(cell.text())
                rec[col] = rf"\textbf{{{txt}}}" if cell.best else txt
            else:
                txt = cell.text()
                rec[col] = f"**{txt}**" if cell.best else txt
        records.append(rec)
    return pd.DataFrame(records, columns=table.columns)


def _render_markdown(table: Table) -> str:
    frame = _display_frame(table, "md")
    frame.columns = [c.label() for c in table.columns]
    fams, prev = [], None
    for fam, _, _ in table.rows:  # a family's name on its first row only: rows read as groups
        fams.append(fam if fam != prev else "")
        prev = fam
    frame.insert(0, "calib", [r[2] for r in table.rows])
    frame.insert(0, "method", [r[1] for r in table.rows])
    frame.insert(0, "family", fams)
    body = frame.to_markdown(index=False, disable_numparse=True)
    notes = "\n".join(f"- {n}" for n in table.notes)
    return f"### {table.model}\n\n{table.caption}\n\n{body}\n\n{notes}\n"


def _render_latex(table: Table) -> str:
    frame = _display_frame(table, "latex")
    frame.columns = pd.MultiIndex.from_tuples([(latex_escape(c.quant), c.metric_label("latex"))
                                               for c in table.columns])
    frame.index = pd.MultiIndex.from_tuples([tuple(latex_escape(x) for x in r) for r in table.rows],
                                            names=["Family", "Method", "Calib."])
    caption = latex_escape(table.caption) + " " + " ".join(latex_escape(n) + "." for n in table.notes)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", table.model).strip("-").lower()
    tex = frame.to_latex(escape=False, multirow=False, sparsify=True, multicolumn=True, multicolumn_format="c",
                         column_format="lll" + "r" * len(table.columns),
                         caption=(caption, f"{latex_escape(table.model)} leaderboard"), label=f"tab:{slug}")
    return _rule_between_families(tex)


def _rule_between_families(tex: str) -> str:
    """A booktabs \\midrule before each new family: sparsified rows start with "&" inside a family."""
    lines = tex.splitlines()
    start, end = lines.index(r"\midrule"), lines.index(r"\bottomrule")
    out = lines[:start + 2]
    for line in lines[start + 2:end]:
        if not line.lstrip().startswith("&"):
            out.append(r"\midrule")
        out.append(line)
    return "\n".join(out + lines[end:]) + "\n"


def _render_csv(table: Table) -> str:
    """Long numeric form: one line per entry, for spreadsheets and scripts."""
    recs = []
    for row in table.rows:
        for col in table.columns:
            c = table.cell(row, col)
            if c.n == 0:
                continue
            recs.append({"model": table.model, "family": row[0], "method": row[1], "calib": row[2],
                         "quant": col.quant, "metric": col.metric, "dataset": col.dataset, "group": col.group,
                         "mean": c.mean, "ci95_half": c.half, "n": c.n, "n_ok": c.n_ok, "status": c.status,
                         "best": c.best})
    return pd.DataFrame(recs).to_csv(index=False)


FORMATS = {"md": (_render_markdown, "md"), "latex": (_render_latex, "tex"), "csv": (_render_csv, "csv")}


def render(table: Table, fmt: str = "md") -> str:
    """Render a table as ``md`` (markdown, best in **bold**), ``latex`` (booktabs, \\textbf) or ``csv``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[fmt][0](table)


def write_report(df: pd.DataFrame, out: Path, fmt: str, plots: bool = True) -> list[Path]:
    """Write one table file per model (and the plots under ``out/plots``); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model, table in leaderboard(df).items():
        path = out / f"leaderboard_{slug(model)}.{FORMATS[fmt][1]}"
        path.write_text(render(table, fmt))
        written.append(path)
    if plots:
        from ptqbench.plots import write_plots  # matplotlib only when plotting

        written += write_plots(df, out / "plots")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptqbench.report", description=__doc__.split("\n")[0])
    ap.add_argument("results_dir", help="a results folder (its cells/*.parquet)")
    ap.add_argument("--format", choices=list(FORMATS), default="md", help="table format (default: md)")
    ap.add_argument("--out", type=Path, help="write tables (and plots) into this folder instead of printing")
    ap.add_argument("--no-plots", action="store_true", help="with --out: write the tables only")
    ap.add_argument("--grid", action="store_true",
                    help="transform x rounding perplexity grids of the recipes (md or latex) instead of leaderboards")
    args = ap.parse_args(argv)
    try:
        df = load_results(args.results_dir)
        if args.grid:
            if args.out is None:
                print("\n\n".join(render_grid(t, args.format) for t in grid_tables(df)))
            else:
                for path in write_grids(df, args.out, args.format):
                    print(path)
        elif args.out is None:
            print("\n\n".join(render(t, args.format) for t in leaderboard(df).values()))
        else:
            for path in write_report(df, args.out, args.format, plots=not args.no_plots):
                print(path)
    except (ResultsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps the interpreter's exit flush quiet
        return 0
    except OSError as e:  # unwritable --out and the like: the user's to fix, no traceback
        print(f"error: {e.strerror or e}: {e.filename or args.out}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
