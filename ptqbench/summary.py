"""Summaries across cells: seed confidence intervals and the calibration-shift matrix.

``python -m ptqbench.summary seeds <results dir> [--metric M ...] [--csv]``
    Groups rows by every column except the seed and what follows from it (``calib_fingerprint``, ``config_hash``)
    and provenance (``git_sha``, ``versions``, ``device``, ``wall_s``, ``timestamp``, ``sweep``, ``status``,
    ``error``), and gives per metric the number of seeds, mean, sample standard deviation and a 95% confidence
    interval of the mean from the t-distribution (``mean ± t_{0.975, n-1} · sd / sqrt(n)``).

``python -m ptqbench.summary shift <results dir> [--metric perplexity] [--csv]``
    Per (model, method, quant): the matrix rows = calibration source, columns = evaluation dataset, values =
    ``metric`` (mean over seeds), then the degradation against the fp16 baseline of the same model
    (``ppl / ppl_fp16 - 1``) and, per evaluation dataset, in-distribution (calibrated on the same source) next to
    out-of-distribution (mean over the other single-source calibrations) and each mixture.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import pandas as pd

from ptqbench.results import ResultsError, load_results

NOT_KEYS = ("seed", "calib_fingerprint", "config_hash", "value", "status", "error", "git_sha", "versions", "device",
            "wall_s", "timestamp", "sweep")
OK = ("ok",)


# ------------------------------------------------------------------------------------------------ seeds
def t_interval(values: list[float] | pd.Series, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample sd, half-width of the two-sided ``level`` t-interval of the mean); NaN where n < 2."""
    from scipy.stats import t

    v = pd.Series(values, dtype="float64").dropna()
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    sd = float(v.std(ddof=1))
    return mean, sd, float(t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def seed_summary(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per (everything but the seed): ``n``, ``seeds``, ``mean``, ``sd``, ``ci_half``, ``ci_lo``, ``ci_hi``.

    Only rows with status ok are used. A deterministic cell (no calibration: its seed does not enter its hash) has
    one row whatever the seeds asked, hence ``n = 1`` and no interval.
    """
    d = df[df["status"].isin(OK)] if "status" in df.columns else df
    keys = [c for c in d.columns if c not in NOT_KEYS]
    out = []
    for key, g in d.groupby(keys, dropna=False, sort=True):
        g = g.drop_duplicates(subset=["seed"]) if "seed" in g.columns else g  # one value per seed
        mean, sd, half = t_interval(g["value"], level)
        row: dict[str, Any] = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row.update(n=len(g), seeds=",".join(str(s) for s in sorted(g["seed"].unique())) if "seed" in g else "",
                   mean=mean, sd=sd, ci_half=half, ci_lo=mean - half, ci_hi=mean + half)
        out.append(row)
    cols = keys + ["n", "seeds", "mean", "sd", "ci_half", "ci_lo", "ci_hi"]
    return pd.DataFrame(out, columns=cols)


# ------------------------------------------------------------------------------------------------ shift matrix
def shift_matrix(df: pd.DataFrame, metric: str = "perplexity") -> dict[tuple[str, str, str], dict[str, pd.DataFrame]]:
    """Per (model, method, quant): ``{"value", "degradation", "id_vs_ood"}`` frames (see the module docstring).

    ``value``: rows = calibration source, columns = evaluation dataset, mean over seeds, plus an ``fp16`` row.
    ``degradation``: value / fp16 - 1. ``id_vs_ood``: per evaluation dataset, ``in_dist`` (calib == dataset),
    ``out_of_dist`` (mean over the other calibration sources that are themselves evaluation datasets) and one
    column per other calibration (mixtures).
    """
    d = df[(df["metric"] == metric) & (df["status"].isin(OK))]
    if d.empty:
        raise ResultsError(f"no ok rows with metric {metric!r}: run the calibration-shift sweep first")
    base = d[d["family"] == "baseline"].groupby(["model", "dataset"])["value"].mean()
    q = d[d["family"] != "baseline"]
    out: dict[tuple[str, str, str], dict[str, pd.DataFrame]] = {}
    for (model, method, quant), g in q.groupby(["model", "method", "quant"], sort=True):
        value = g.pivot_table(index="calib", columns="dataset", values="value", aggfunc="mean")
        value = value.sort_index().reindex(sorted(value.columns), axis=1)
        value.columns.name, value.index.name = "eval", "calib"
        fp = base.loc[model] if model in base.index.get_level_values(0) else pd.Series(dtype="float64")
        fp = fp.reindex(value.columns)
        deg = value / fp - 1.0
        evals = list(value.columns)
        single = [c for c in value.index if c in evals]
        others = [c for c in value.index if c not in evals]
        rows = {}
        for e in evals:
            r = {"in_dist": deg.at[e, e] if e in deg.index else math.nan,
                 "out_of_dist": deg.loc[[c for c in single if c != e], e].mean() if len(single) > 1 else math.nan}
            r.update({f"calib={c}": deg.at[c, e] for c in others})
            rows[e] = r
        idood = pd.DataFrame.from_dict(rows, orient="index")
        idood.index.name = "eval"
        out[(model, method, quant)] = {"value": pd.concat([value, fp.to_frame("fp16").T]), "degradation": deg,
                                       "id_vs_ood": idood}
    return out


# ------------------------------------------------------------------------------------------------ CLI
def _print(df: pd.DataFrame, csv: bool, index: bool = False) -> None:
    if csv:
        df.to_csv(sys.stdout, index=index)
        return
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.float_format", "{:.4g}".format):
        print(df.to_string(index=index))


def _cmd_seeds(df: pd.DataFrame, args: argparse.Namespace) -> int:
    if args.metric:
        df = df[df["metric"].isin(args.metric)]
    s = seed_summary(df)
    if s.empty:
        print("error: no ok rows to summarize", file=sys.stderr)
        return 2
    show = [c for c in ("model", "method", "quant", "calib", "calib_n", "calib_seqlen", "metric", "dataset", "group",
                        "n", "seeds", "mean", "sd", "ci_half", "ci_lo", "ci_hi") if c in s.columns]
    _print(s if args.csv else s[show], args.csv)
    return 0


def _cmd_shift(df: pd.DataFrame, args: argparse.Namespace) -> int:
    metric = (args.metric or ["perplexity"])[0]
    for (model, method, quant), frames in shift_matrix(df, metric).items():
        if args.csv:
            for name, f in frames.items():
                print(f"# {model} {method} {quant} {name}")
                _print(f, True, index=True)
            continue
        print(f"\n== {model} / {method} / {quant}: {metric} (rows: calibration, columns: evaluation) ==")
        _print(frames["value"], False, index=True)
        print(f"\ndegradation vs fp16 ({metric}/{metric}_fp16 - 1)")
        _print(frames["degradation"], False, index=True)
        print("\nin-distribution vs out-of-distribution degradation, per evaluation set")
        _print(frames["id_vs_ood"], False, index=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptqbench.summary", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("seeds", "mean, sd and 95%% t-interval over seeds"),
                           ("shift", "calibration-source x evaluation-set matrix")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("results_dir")
        p.add_argument("--metric", action="append", help="metric(s) to keep (seeds: any; shift: default perplexity)")
        p.add_argument("--csv", action="store_true", help="print csv instead of text tables")
    args = ap.parse_args(argv)
    try:
        df = load_results(args.results_dir)
        return _cmd_seeds(df, args) if args.cmd == "seeds" else _cmd_shift(df, args)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
