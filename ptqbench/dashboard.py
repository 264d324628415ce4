"""Regression dashboard: compare a results folder against a committed baseline; gate CI on it.

``python -m ptqbench.dashboard --baseline DIR --current DIR [--out page.html]
[--rtol-ppl 0.02] [--atol-acc 1.0] [--latency-ratio 1.10] [--fail-on-missing] [--no-plots]``

Cells are matched by their configuration columns (model, method, scheme, calibration, seed, ...), not by
provenance (git sha, versions, device, timings) and not by config hash alone, so a baseline stays comparable
when the hash recipe changes. Each metric is judged with its own tolerance: relative for perplexity, absolute
points for accuracy, a ratio for latency; time and memory are shown but never gate.

Writes one self-contained HTML page (plots inlined as base64 PNG) and exits 1 when any metric regressed beyond
tolerance, 0 otherwise, 2 on bad input (missing or empty folder, unreadable file, another model or protocol).
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ptqbench.errors import ConfigError
from ptqbench.tables import prepare
from ptqbench.results import COLUMNS, ResultsError, cell_path, load_results

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# What identifies a cell across runs. family and sweep are labels, not settings, so a re-labelled method still
# matches; provenance and the config hash are deliberately left out (see the module docstring).
CONFIG_COLUMNS = ["model", "method", "w_bits", "a_bits", "group_size", "sym", "quant", "calib", "calib_n",
                  "calib_seqlen", "seed"]
METRIC_COLUMNS = ["metric", "dataset", "group"]
PROVENANCE = ["git_sha", "versions", "device", "timestamp", "wall_s", "config_hash", "sweep"]
VERDICT_ORDER = ["regression", "improvement", "unchanged", "info", "not compared"]


@dataclass(frozen=True)
class Tolerances:
    rtol_ppl: float = 0.02  # perplexity: relative increase allowed
    atol_acc: float = 1.0  # accuracy: absolute drop allowed, in percentage points
    latency_ratio: float = 1.10  # latency: allowed slow-down factor
    rtol_bits: float = 1e-6  # effective bits should not move at all: any change is a packing change


def metric_kind(metric: str) -> str:
    """How a metric is judged: ppl (relative), acc (points), latency (ratio), bits (exact), info (never gates)."""
    if metric.startswith("info:"):  # a method's own diagnostics (iterations, losses): never gate
        return "info"
    if metric == "perplexity" or metric.startswith("ppl"):
        return "ppl"
    if metric.startswith("latency"):
        return "latency"
    if metric == "effective_bits":
        return "bits"
    if "acc" in metric and not metric.endswith("_gap"):
        return "acc"
    return "info"  # quant_time_s, peak_host_mem_gib, wall clock: machine-dependent, shown for information


def _is_fraction(unit: str, *values: float) -> bool:
    """Accuracy stored as a fraction (0..1) rather than percent: judged after scaling to points."""
    if unit.strip().lower() in ("%", "percent", "pct", "points", "pp"):
        return False
    finite = [abs(v) for v in values if math.isfinite(v)]
    return bool(finite) and max(finite) <= 1.0


def judge(kind: str, base: float, cur: float, base_status: str, cur_status: str, unit: str,
          tol: Tolerances) -> tuple[str, str, str]:
    """(verdict, change, tolerance) for one metric of one matched cell."""
    base_ok = base_status == "ok" and math.isfinite(base)
    cur_ok = cur_status == "ok" and math.isfinite(cur)
    if kind == "info":
        change = f"{cur / base:.2f}x" if base_ok and cur_ok and base else ""
        return "info", change, "informational"
    if "skipped" in (base_status, cur_status):
        return "not compared", "", f"skipped on {'baseline' if base_status == 'skipped' else 'current'}"
    if base_ok and not cur_ok:
        return "regression", f"now {cur_status or 'missing'}", "must stay measurable"
    if cur_ok and not base_ok:
        return "improvement", f"was {base_status}", ""
    if not base_ok:
        return "unchanged", f"both {cur_status}", ""
    if kind == "ppl":
        rel = cur / base - 1
        bad, good = rel > tol.rtol_ppl, rel < -tol.rtol_ppl
        change, allowed = f"{rel:+.2%}", f"±{tol.rtol_ppl:.1%}"
    elif kind == "acc":
        scale = 100.0 if _is_fraction(unit, base, cur) else 1.0
        delta = (cur - base) * scale
        bad, good = delta < -tol.atol_acc, delta > tol.atol_acc
        change, allowed = f"{delta:+.2f} pts", f"±{tol.atol_acc:g} pts"
    elif kind == "latency":
        ratio = cur / base if base else math.inf
        bad, good = ratio > tol.latency_ratio, ratio < 1 / tol.latency_ratio
        change, allowed = f"{ratio:.3f}x", f"≤{tol.latency_ratio:g}x"
    else:  # bits
        rel = cur / base - 1 if base else math.inf
        bad, good = rel > tol.rtol_bits, rel < -tol.rtol_bits
        change, allowed = f"{cur - base:+.4f} bits", "unchanged"
    return ("regression" if bad else "improvement" if good else "unchanged"), change, allowed


def _canon(x: object) -> str:
    """A value as a matching key: 4, 4.0 and "4" agree; True and "True" agree; missing is ""."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or (not isinstance(x, str) and pd.isna(x)):
        return ""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    try:
        f = float(x)  # type: ignore[arg-type]
        return str(int(f)) if f.is_integer() else repr(f)
    except (TypeError, ValueError):
        return str(x)


def _keyed(df: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    d = prepare(df)
    # a calibration-free cell does not depend on the seed (one hash for all seeds): whichever seed ran first is
    # recorded, so it must not decide matching
    d.loc[d["calib"] == "none", "seed"] = np.nan
    cols = CONFIG_COLUMNS + extra
    d["cell_key"] = ["|".join(_canon(v) for v in vals) for vals in zip(*(d[c] for c in cols))]
    d["row_key"] = _row_keys(d)
    return d


def _row_keys(d: pd.DataFrame) -> pd.Series:
    return d["cell_key"] + "||" + d["metric"] + "|" + d["dataset"] + "|" + d["group"]


def _source(folder: str | Path, config_hash: str) -> str:
    """The file a row came from, for error messages."""
    p = cell_path(folder, config_hash)
    return str(p) if p.exists() else str(folder)


@dataclass
class Comparison:
    """The outcome of comparing two results folders."""

    rows: pd.DataFrame  # one per matched (cell, metric, dataset, group): values, change, verdict
    missing_in_current: pd.DataFrame  # baseline cells the current run lacks
    new_in_current: pd.DataFrame  # current cells the baseline lacks
    baseline: pd.DataFrame
    current: pd.DataFrame
    baseline_dir: str
    current_dir: str
    tolerances: Tolerances

    @property
    def regressions(self) -> pd.DataFrame:
        return self.rows[self.rows["verdict"] == "regression"]

    @property
    def improvements(self) -> pd.DataFrame:
        return self.rows[self.rows["verdict"] == "improvement"]


def _check_same_model(base: pd.DataFrame, cur: pd.DataFrame, base_dir: str, cur_dir: str) -> None:
    bm, cm = set(base["model"]), set(cur["model"])
    if not bm & cm:
        raise ResultsError(f"baseline {base_dir} is for model {', '.join(sorted(bm))} but current {cur_dir} is for "
                           f"{', '.join(sorted(cm))}: compare runs of the same model")


def _check_protocols(m: pd.DataFrame, base_dir: str, cur_dir: str) -> None:
    """Matched values measured under different protocols are not comparable: refuse, naming both files."""
    diff = m[(m["protocol_b"] != m["protocol_c"]) & (m["protocol_b"] != "") & (m["protocol_c"] != "")]
    if len(diff):
        r = diff.iloc[0]
        what = f"{r['metric']}{'/' + r['dataset'] if r['dataset'] else ''} of {r['method']} {r['quant']}"
        raise ResultsError(
            f"baseline {_source(base_dir, r['config_hash_b'])} measured {what} under protocol {r['protocol_b']!r} "
            f"but current {_source(cur_dir, r['config_hash_c'])} under {r['protocol_c']!r}"
            f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}: regenerate the baseline with this protocol")


def compare(base_df: pd.DataFrame, cur_df: pd.DataFrame, tol: Tolerances = Tolerances(),
            base_dir: str = "baseline", cur_dir: str = "current") -> Comparison:
    """Match the two tables cell by cell and judge every metric; raises ResultsError on incomparable input."""
    # extra columns (method hyperparameters a future store may add) are settings: match on them too
    extra = sorted((set(base_df.columns) & set(cur_df.columns)) - set(COLUMNS))
    base, cur = _keyed(base_df, extra), _keyed(cur_df, extra)
    _check_same_model(base, cur, base_dir, cur_dir)
    # Where the configuration columns do not tell cells apart (a setting outside them), fall back to the hash.
    for d in (base, cur):
        ambiguous = d.groupby("cell_key")["config_hash"].transform("nunique") > 1
        d.loc[ambiguous, "cell_key"] = d.loc[ambiguous, "cell_key"] + "#" + d.loc[ambiguous, "config_hash"]
        d["row_key"] = _row_keys(d)
    keep = ["row_key", "cell_key", "model", "method", "family", "quant", "calib", "seed", "metric", "dataset",
            "group"]
    vals = ["value", "status", "unit", "protocol", "config_hash", "calib_fingerprint"]
    m = base[keep + vals].merge(cur[["row_key"] + vals], on="row_key", how="outer", suffixes=("_b", "_c"),
                                indicator="side")
    # rows only in current lack the label columns: take them from the current side
    m["side"] = m["side"].astype(str)
    only_c = m["side"] == "right_only"
    if only_c.any():
        labels = cur.drop_duplicates("row_key").set_index("row_key")[keep[1:]]
        for c in keep[1:]:
            m.loc[only_c, c] = m.loc[only_c, "row_key"].map(labels[c])
    for c in ("status_b", "status_c", "unit_b", "unit_c", "protocol_b", "protocol_c"):
        m[c] = m[c].fillna("")

    cells_b, cells_c = set(base["cell_key"]), set(cur["cell_key"])
    both = cells_b & cells_c
    if not both:
        raise ResultsError(f"no cell of current {cur_dir} matches a cell of baseline {base_dir} (same model, "
                           "method, scheme, calibration and seed): is this the baseline of another sweep?")
    m = m[m["cell_key"].isin(both)].copy()
    _check_protocols(m, base_dir, cur_dir)

    verdicts = []
    for r in m.itertuples(index=False):
        if r.side != "both":  # a metric one side measured and the other did not
            side = "current" if r.side == "left_only" else "baseline"
            kind = metric_kind(r.metric)
            verdict = "regression" if side == "current" and kind != "info" and r.status_b == "ok" else "not compared"
            verdicts.append((verdict, f"missing in {side}", ""))
            continue
        verdicts.append(judge(metric_kind(r.metric), r.value_b, r.value_c, r.status_b, r.status_c,
                              r.unit_b or r.unit_c, tol))
    m["verdict"] = [v[0] for v in verdicts]
    m["change"] = [v[1] for v in verdicts]
    m["tolerance"] = [v[2] for v in verdicts]
    m["kind"] = m["metric"].map(metric_kind)
    m["calib_data_changed"] = (m["calib_fingerprint_b"].fillna("") != m["calib_fingerprint_c"].fillna("")) & \
        m["calib_fingerprint_b"].fillna("").ne("") & m["calib_fingerprint_c"].fillna("").ne("")
    m["order"] = m["verdict"].map(VERDICT_ORDER.index)
    m = m.sort_values(["order", "method", "quant", "calib", "seed", "metric", "dataset"]).drop(columns="order")

    def cells(d: pd.DataFrame, keys: set[str]) -> pd.DataFrame:
        c = d[d["cell_key"].isin(keys)].drop_duplicates("cell_key")
        return c[["model", "method", "family", "quant", "calib", "seed", "config_hash"]].sort_values(
            ["method", "quant", "calib", "seed"])

    return Comparison(m.reset_index(drop=True), cells(base, cells_b - cells_c), cells(cur, cells_c - cells_b),
                      base, cur, str(base_dir), str(cur_dir), tol)


def compare_dirs(baseline: str | Path, current: str | Path, tol: Tolerances = Tolerances()) -> Comparison:
    """Load two results folders and compare them."""
    return compare(_load_whole(baseline), _load_whole(current), tol, str(baseline), str(current))


def _load_whole(folder: str | Path) -> pd.DataFrame:
    """A folder's rows, refusing one with a corrupt cell file (named): ``load_results`` skips such a file, but a
    regression gate that silently compared the rest would report its cells as missing instead of saying why."""
    df = load_results(folder)
    corrupt = df.attrs.get("corrupt") or []
    if corrupt:
        raise ResultsError(f"cannot read results file {corrupt[0]}"
                           f"{f' (and {len(corrupt) - 1} more)' if len(corrupt) > 1 else ''}: corrupt; rerun its "
                           f"sweep to recompute it")
    return df


# --- the page ----------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.banner{padding:12px 16px;border-radius:6px;font-weight:600;font-size:16px;margin:12px 0}
.banner.fail{background:#fde2e1;color:#8a1c14;border:1px solid #f5b5b0}
.banner.pass{background:#e3f5e6;color:#1d5e2b;border:1px solid #a9dcb3}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.regression td{background:#fde2e1} tr.regression td.verdict{color:#a0180e;font-weight:700}
tr.improvement td{background:#e3f5e6} tr.improvement td.verdict{color:#1d6b30;font-weight:600}
tr.info td,tr.not-compared td{color:#666}
code{font-size:12px;background:#f6f6f6;padding:1px 3px;border-radius:3px;word-break:break-all}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.muted{color:#666;font-size:13px}
td.st,td.change,td.tolerance,td.verdict,td.num{white-space:nowrap}
"""


def _esc(x: object) -> str:
    return html.escape(_fmt(x) if isinstance(x, float) else _canon(x) if x is not None else "")


def _table(d: pd.DataFrame, cols: list[tuple[str, str]], row_class: str | None = None, num: tuple = ()) -> str:
    """An HTML table of ``d``'s columns as (header, column); rows get ``row_class``'s value as their class."""
    if d.empty:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{_esc(h)}</th>" for h, _ in cols)
    body = []
    for _, r in d.iterrows():
        cls = f' class="{_esc(r[row_class]).replace(" ", "-")}"' if row_class else ""
        tds = "".join(f'<td class="{"num" if c in num else c}">{_esc(r[c])}</td>' for _, c in cols)
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_COMPARE_COLS = [("model", "model"), ("method", "method"), ("family", "family"), ("scheme", "quant"),
                 ("calib", "calib"), ("seed", "seed"), ("metric", "metric"), ("dataset", "dataset"),
                 ("group", "group"), ("baseline", "value_b"), ("current", "value_c"), ("status (base → cur)", "st"),
                 ("change", "change"), ("tolerance", "tolerance"), ("verdict", "verdict")]
_CELL_COLS = [("model", "model"), ("method", "method"), ("family", "family"), ("scheme", "quant"),
              ("calib", "calib"), ("seed", "seed"), ("config hash", "config_hash")]


def comparison_figure(comp: Comparison) -> Figure | None:
    """Current versus baseline per judged metric kind (log axes for perplexity); regressions in red."""
    from ptqbench.plots import PAPER_RC, plt

    d = comp.rows[(comp.rows["side"] == "both") & comp.rows["kind"].isin(["ppl", "acc", "latency"])]
    d = d[np.isfinite(d["value_b"].astype(float)) & np.isfinite(d["value_c"].astype(float))]
    kinds = [k for k in ("ppl", "acc", "latency") if (d["kind"] == k).any()]
    if not kinds:
        return None
    titles = {"ppl": "perplexity", "acc": "accuracy", "latency": "latency"}
    colors = {"regression": "#d62728", "improvement": "#2ca02c"}
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(1, len(kinds), figsize=(3.3 * len(kinds), 3.2), squeeze=False,
                                 constrained_layout=True)
        for ax, k in zip(axes.flat, kinds):
            p = d[d["kind"] == k]
            for verdict, g in p.groupby("verdict"):
                ax.scatter(g["value_b"], g["value_c"], s=22, color=colors.get(verdict, "#1f77b4"), label=verdict,
                           edgecolors="black", linewidths=0.3, zorder=3)
            lo = float(np.nanmin(np.r_[p["value_b"], p["value_c"]]))
            hi = float(np.nanmax(np.r_[p["value_b"], p["value_c"]]))
            if k != "acc" and lo > 0 and hi / lo > 10:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", zorder=1)
            ax.set_xlabel(f"baseline {titles[k]}")
            ax.set_ylabel(f"current {titles[k]}")
            ax.set_title(titles[k])
            ax.legend(frameon=False)
        fig.suptitle("current vs. baseline (on the dashed line: unchanged)")
    return fig


def _img(fig: Figure) -> str:
    from ptqbench.plots import png_bytes  # matplotlib only when a page is drawn

    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(png_bytes(fig)).decode()}">'


def _provenance(d: pd.DataFrame, folder: str) -> dict[str, str]:
    def uniq(col: str, short: int | None = None) -> str:
        vals = sorted({str(v)[:short] if short else str(v) for v in d.get(col, pd.Series(dtype=object)).dropna()
                       if str(v) not in ("", "None", "nan")})
        return ", ".join(vals) or "unrecorded"

    ts = pd.to_datetime(d["timestamp"], errors="coerce", utc=True).dropna() if "timestamp" in d else pd.Series()
    return {"folder": folder, "cells": str(d["config_hash"].nunique()), "models": uniq("model"),
            "sweeps": uniq("sweep"), "git sha": uniq("git_sha", 12), "versions": uniq("versions"),
            "device": uniq("device"),
            "timestamps": f"{ts.min():%Y-%m-%d %H:%M} – {ts.max():%Y-%m-%d %H:%M} UTC" if len(ts) else "unrecorded"}


def page_html(comp: Comparison, plots: bool = True) -> str:
    """The whole dashboard as one self-contained HTML document (plots inlined unless ``plots`` is False)."""
    rows = comp.rows.assign(st=[f"{b or '—'} → {c or '—'}" for b, c in zip(comp.rows["status_b"],
                                                                         comp.rows["status_c"])])
    reg, imp = rows[rows["verdict"] == "regression"], rows[rows["verdict"] == "improvement"]
    tol = comp.tolerances
    failed = len(reg) > 0
    banner = (f'<div class="banner fail" id="verdict">FAIL: {len(reg)} metric(s) regressed beyond tolerance</div>'
              if failed else '<div class="banner pass" id="verdict">PASS: no metric regressed beyond tolerance</div>')
    figs = []
    if plots:
        from ptqbench.plots import latency_figure, pareto_figure

        figs.append(comparison_figure(comp))
        for model in sorted(set(comp.current["model"]) & set(comp.baseline["model"])):
            figs += [pareto_figure(comp.current, model), latency_figure(comp.current, model)]
    imgs = "".join(_img(f) for f in figs if f is not None) or '<p class="muted">no plots</p>'

    protos = []
    for side, d in (("baseline", comp.baseline), ("current", comp.current)):
        for (metric, ds), g in d[d["protocol"] != ""].groupby(["metric", "dataset"]):
            protos.append({"metric": metric, "dataset": ds, "side": side,
                           "protocol": " | ".join(sorted(set(g["protocol"])))})
    proto_df = pd.DataFrame(protos, columns=["metric", "dataset", "side", "protocol"])
    prov = pd.DataFrame([_provenance(comp.baseline, comp.baseline_dir), _provenance(comp.current, comp.current_dir)],
                        index=["baseline", "current"]).T.reset_index(names="")
    changed_fp = rows[rows["calib_data_changed"]].drop_duplicates("cell_key")
    fp_note = (f'<p class="muted">{len(changed_fp)} matched cell(s) were calibrated on different data (the '
               "calibration fingerprint changed).</p>" if len(changed_fp) else "")
    nums = ("value_b", "value_c")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ptqbench regression dashboard</title>
<style>{_CSS}</style></head><body>
<h1>ptqbench regression dashboard</h1>
<p class="muted">baseline <code>{html.escape(comp.baseline_dir)}</code> vs. current
<code>{html.escape(comp.current_dir)}</code> · tolerances: perplexity ±{tol.rtol_ppl:.1%} (relative), accuracy
±{tol.atol_acc:g} points, latency ≤{tol.latency_ratio:g}x; time and memory are informational</p>
{banner}
<p id="counts">{len(reg)} regression(s) · {len(imp)} improvement(s) · {len(comp.missing_in_current)} cell(s)
missing in current · {len(comp.new_in_current)} new cell(s) · {len(rows)} metric(s) compared</p>
<h2 id="regressions">Regressions</h2>
{_table(reg, _COMPARE_COLS, "verdict", nums)}
<h2 id="improvements">Improvements</h2>
{_table(imp, _COMPARE_COLS, "verdict", nums)}
<h2 id="missing">Cells missing in current</h2>
{_table(comp.missing_in_current, _CELL_COLS)}
<h2 id="new">Cells new in current (no baseline)</h2>
{_table(comp.new_in_current, _CELL_COLS)}
<h2 id="plots">Plots</h2>
{imgs}
<h2 id="all">All compared metrics</h2>
{fp_note}
{_table(rows, _COMPARE_COLS, "verdict", nums)}
<h2 id="protocol">Protocols</h2>
{_table(proto_df, [(c, c) for c in proto_df.columns])}
<h2 id="provenance">Provenance</h2>
{_table(prov, [(c, c) for c in prov.columns])}
</body></html>
"""


def write_page(comp: Comparison, out: str | Path, plots: bool = True) -> Path:
    """Write the page and return its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page_html(comp, plots), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptqbench.dashboard", description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="the reference results folder (e.g. results/baselines/...)")
    ap.add_argument("--current", required=True, help="the results folder to check")
    ap.add_argument("--out", type=Path, default=Path("dashboard.html"), help="HTML page to write")
    ap.add_argument("--rtol-ppl", type=float, default=Tolerances.rtol_ppl,
                    help="relative perplexity increase tolerated (default 0.02 = 2%%)")
    ap.add_argument("--atol-acc", type=float, default=Tolerances.atol_acc,
                    help="accuracy drop tolerated, percentage points (default 1.0)")
    ap.add_argument("--latency-ratio", type=float, default=Tolerances.latency_ratio,
                    help="latency slow-down factor tolerated (default 1.10)")
    ap.add_argument("--fail-on-missing", action="store_true", help="also exit 1 when baseline cells are missing")
    ap.add_argument("--no-plots", action="store_true", help="leave the plots out of the page (faster)")
    args = ap.parse_args(argv)
    tol = Tolerances(rtol_ppl=args.rtol_ppl, atol_acc=args.atol_acc, latency_ratio=args.latency_ratio)
    try:
        if min(tol.rtol_ppl, tol.atol_acc) < 0 or tol.latency_ratio < 1:
            raise ConfigError("tolerances must be >= 0 (and --latency-ratio >= 1)")
        comp = compare_dirs(args.baseline, args.current, tol)
        write_page(comp, args.out, plots=not args.no_plots)
    except (ResultsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    n_reg, n_imp = len(comp.regressions), len(comp.improvements)
    n_miss, n_new = len(comp.missing_in_current), len(comp.new_in_current)
    print(f"{n_reg} regression(s), {n_imp} improvement(s), {n_miss} cell(s) missing in current, "
          f"{n_new} new; page: {args.out}")
    for r in comp.regressions.itertuples(index=False):
        print(f"  REGRESSION {r.method} {r.quant} calib={r.calib} seed={_canon(r.seed)} {r.metric}"
              f"{'/' + r.dataset if r.dataset else ''}: {_fmt(r.value_b)} -> {_fmt(r.value_c)} ({r.change})")
    return 1 if n_reg or (args.fail_on_missing and n_miss) else 0


def _fmt(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else (f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}")


if __name__ == "__main__":
    sys.exit(main())
