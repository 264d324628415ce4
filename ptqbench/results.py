"""The results store: one tidy long table, one file per cell, written atomically.

A row is one (cell, metric, dataset, group) value. Each cell is a folder-less pair of files
``<results_dir>/cells/<config_hash>.parquet`` (+ ``.csv`` beside it for people and diffs), written to a temporary
name and renamed, so a crash never leaves a half-written cell that looks complete. Readers concatenate.

A cell file that cannot be read (truncated, corrupted, or without the columns every cell has) is *corrupt*: the
reader logs a warning naming its path and skips it, and ``cell_status`` reports it as ``corrupt``, so the next run
recomputes it instead of trusting it.

``python -m ptqbench.results <dir> [--all] [--csv]`` prints a folder as a table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

COLUMNS = [
    "model", "method", "family", "w_bits", "a_bits", "group_size", "sym", "quant",
    "calib", "calib_n", "calib_seqlen", "seed", "calib_fingerprint",
    "metric", "dataset", "group", "value", "unit", "status", "error", "protocol",
    "config_hash", "sweep", "git_sha", "versions", "device", "wall_s", "timestamp",
]
# status of a row: ok | diverged (NaN/inf value) | failed (the cell raised; error says why) | skipped (not measurable
# here, e.g. kernel latency without a GPU)
STATUSES = ("ok", "diverged", "failed", "skipped")
COMPLETE = ("ok", "diverged", "skipped")  # a cell whose rows all have these statuses is not recomputed


log = logging.getLogger("ptqbench")
_REQUIRED = ("metric", "value", "status", "config_hash")  # a cell file without these is not a cell


class ResultsError(ValueError):
    """A results folder or file that cannot be read; the message names it."""


def cells_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "cells"


def cell_path(results_dir: str | os.PathLike, config_hash: str) -> Path:
    return cells_dir(results_dir) / f"{config_hash}.parquet"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[COLUMNS + extra]
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    return df


def write_cell(results_dir: str | os.PathLike, config_hash: str, rows: list[dict[str, Any]]) -> Path:
    """Write one cell's rows atomically (parquet, then a csv copy); returns the parquet path."""
    df = to_frame(rows)
    path = cell_path(results_dir, config_hash)
    # csv first: the parquet's presence is what marks the cell as written
    _atomic_write(path.with_suffix(".csv"), lambda tmp: df.to_csv(tmp, index=False))
    _atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    return path


def read_cell(path: Path) -> pd.DataFrame:
    """One cell file's rows; ResultsError (naming the path) when it is unreadable or not a cell."""
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a corrupted file)
        raise ResultsError(f"cannot read results file {path}: {type(e).__name__}: {e}") from None
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing or not len(df):
        raise ResultsError(f"results file {path} is not a cell: "
                           f"{f'no columns {missing}' if missing else 'no rows'}")
    return df


def cell_status(results_dir: str | os.PathLike, config_hash: str) -> str | None:
    """``complete``, ``failed``, ``corrupt`` (unreadable: logged with its path, recomputed by the next run) or None
    (absent) for a cell."""
    path = cell_path(results_dir, config_hash)
    if not path.exists():
        return None
    try:
        df = read_cell(path)
    except ResultsError as e:
        log.warning("%s: corrupt, it will be recomputed", e)
        return "corrupt"
    return "complete" if df["status"].isin(COMPLETE).all() else "failed"


def _read_any(f: Path) -> pd.DataFrame:
    if f.suffix != ".csv":
        return read_cell(f)
    try:
        return pd.read_csv(f)
    except Exception as e:  # noqa: BLE001
        raise ResultsError(f"cannot read results file {f}: {type(e).__name__}: {e}") from None


def load_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """All rows of a results folder (its ``cells/`` files, or csv/parquet files directly inside it). Corrupt files
    are skipped with a warning naming each; their paths are in ``df.attrs["corrupt"]``."""
    root = Path(results_dir)
    if not root.exists():
        raise ResultsError(f"results folder {root} does not exist: run a sweep first or pass the right path")
    files = sorted(cells_dir(root).glob("*.parquet")) if cells_dir(root).is_dir() else []
    if not files:
        files = sorted(root.glob("*.parquet")) or sorted(root.glob("*.csv"))
    if not files:
        raise ResultsError(f"results folder {root} holds no result files (cells/*.parquet)")
    frames, corrupt = [], []
    for f in files:
        try:
            frames.append(_read_any(f))
        except ResultsError as e:  # one bad file must not hide every other cell from reports and dashboards
            log.warning("%s: skipped (a rerun of its sweep recomputes it)", e)
            corrupt.append(str(f))
    if not frames:
        raise ResultsError(f"results folder {root} holds no readable result files ({len(corrupt)} corrupt: "
                           f"{', '.join(corrupt[:3])}{', ...' if len(corrupt) > 3 else ''})")
    df = pd.concat(frames, ignore_index=True)
    df.attrs["corrupt"] = corrupt
    missing = [c for c in ("model", "method", "metric", "value", "config_hash") if c not in df.columns]
    if missing:
        raise ResultsError(f"results in {root} lack columns {missing}: not a ptqbench results folder")
    return df


def summary_table(df: pd.DataFrame, metric: str | None = "perplexity") -> pd.DataFrame:
    """Wide view: one row per cell, one column per (metric, dataset[/group]), plus the cell's wall time."""
    d = df if metric is None else df[df["metric"] == metric]
    if d.empty:
        d = df
    keys = ["config_hash", "model", "method", "family", "quant", "calib", "seed"]
    d = d.assign(col=d["metric"] + ":" + d["dataset"].fillna("").astype(str)
                 + d["group"].fillna("").astype(str).map(lambda g: f"/{g}" if g else ""))
    wide = d.pivot_table(index="config_hash", columns="col", values="value", aggfunc="first")
    info = df.groupby("config_hash").agg(
        {**{k: "first" for k in keys[1:]}, "status": lambda s: "ok" if (s == "ok").all() else ",".join(sorted(set(s))),
         "wall_s": "max"})
    out = info.join(wide).reset_index(drop=True)
    return out.sort_values(["model", "family", "method", "quant", "calib", "seed"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptqbench.results", description=__doc__.split("\n")[0])
    ap.add_argument("results_dir")
    ap.add_argument("--all", action="store_true", help="print every row (long form) instead of the summary")
    ap.add_argument("--metric", default="perplexity", help="metric for the summary (default: perplexity)")
    ap.add_argument("--csv", action="store_true", help="print csv instead of a text table")
    args = ap.parse_args(argv)
    try:
        df = load_results(args.results_dir)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = df if args.all else summary_table(df, args.metric)
    if args.csv:
        out.to_csv(sys.stdout, index=False)
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                               "display.float_format", "{:.4g}".format):
            print(out.to_string(index=False))
    for f in df.attrs.get("corrupt", []):
        print(f"warning: corrupt results file {f} skipped", file=sys.stderr)
    failed = df[df["status"] == "failed"]
    if len(failed):
        print(f"\n{failed['config_hash'].nunique()} failed cell(s):", file=sys.stderr)
        for _, r in failed.drop_duplicates("config_hash").iterrows():
            print(f"  {r['method']} {r['quant']} {r['calib']}: {r['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
