"""Helpers shared by the readers of the results store (report, grid_report, plots, dashboard).

Kept apart from ``ptqbench.report`` so that the modules that draw or compare results do not import the leaderboard
(and it does not import them back): the key-column normalisation (``prepare``), a scheme's weight bits, file-name
slugs, number formatting, LaTeX escaping and the one-protocol-per-column check.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from ptqbench.results import ResultsError

# key columns that hold text; missing values become "" so grouping and comparisons treat them alike
TEXT_COLUMNS = ("model", "method", "family", "quant", "calib", "calib_fingerprint", "metric", "dataset", "group",
                "status", "protocol", "config_hash", "unit", "error")


class ProtocolMismatchError(ResultsError):
    """Values measured under different protocols would share one table column."""


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with text key columns filled ("" for missing) and numeric columns as numbers."""
    d = df.copy()
    for col in TEXT_COLUMNS:
        if col not in d.columns:
            d[col] = ""
        d[col] = d[col].astype(object).where(d[col].notna(), "").astype(str)
    d.loc[d["calib"] == "", "calib"] = "none"
    for col in ("w_bits", "a_bits", "group_size", "calib_n", "calib_seqlen", "seed", "value", "wall_s"):
        if col not in d.columns:
            d[col] = np.nan
        d[col] = pd.to_numeric(d[col], errors="coerce")
    return d


def scheme_bits(row: pd.Series | dict) -> float:
    """Weight bits of a scheme: ``w_bits`` when recorded, else parsed from the label (``fp16`` -> 16)."""
    wb = row.get("w_bits")
    if wb is not None and not pd.isna(wb):
        return float(wb)
    m = re.match(r"(?:w|fp|bf|int)(\d+)", str(row.get("quant", "")))
    return float(m.group(1)) if m else math.nan


def slug(text: str) -> str:
    """A file-name-safe version of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def format_number(x: float, like: float | None = None) -> str:
    """Two decimals, or scientific notation for values of 10^4 and above (diverged perplexities)."""
    ref = abs(like if like is not None else x)
    if not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return f"{x:.2e}" if ref >= 1e4 else f"{x:.2f}"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "µ": r"$\mu$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "–": "--", "·": "/",
                  "×": r"$\times$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def check_protocol(g: pd.DataFrame, where: str) -> None:
    """Refuse rows that would share one column but were measured under different protocols: a
    ProtocolMismatchError that names the column (``where``) and each protocol with its methods. Rows without a
    protocol (failed cells) do not count."""
    measured = g[g["protocol"] != ""]
    protos = measured.groupby("protocol")["method"].unique()
    if len(protos) > 1:
        listing = "; ".join(f"{p!r} (methods: {', '.join(sorted(map(str, ms)))})" for p, ms in protos.items())
        raise ProtocolMismatchError(
            f"{where} mixes values measured under different protocols: {listing}; "
            "filter the results to one protocol or re-run the odd cells")
