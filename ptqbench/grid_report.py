"""Transform x rounding grids of the recipe results (``python -m ptqbench.report <dir> --grid``).

One matrix per (model, scheme, evaluation dataset): rows are transforms, columns roundings, each entry the lowest
perplexity over the range choices measured for that (transform, rounding), with the winning range named beside it.
The best entry is bold; fp16 and RTN (``none+minmax+nearest``) perplexities are the references. Seed replicates are
averaged. Where recipes were calibrated on several sources, each source gets its own matrix (calibration-free
recipes appear in all of them). Values measured under different protocols are never put in one matrix.

Results written before the stage columns existed are placed by parsing their method name
(``ptqbench.recipe.parse_recipe``); whole methods (fp16, pbllm) are not recipes and stay out of the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ptqbench.errors import ConfigError
from ptqbench.results import ResultsError
from ptqbench.tables import check_protocol, format_number, latex_escape, prepare, slug

STAGES = ("transform", "range", "rounding")
TRANSFORM_ORDER = ("none", "smoothquant", "awq", "quarot")  # others follow alphabetically
ROUNDING_ORDER = ("nearest", "gptq")
RTN = ("none", "minmax", "nearest")


@dataclass
class GridCell:
    """One entry: the mean over seeds of the winning range (or, with nothing measured, the most telling status)."""

    mean: float = math.nan
    range: str = ""  # the winning range ("" for a reference)
    n: int = 0  # cells (seeds) behind the entry
    n_ok: int = 0  # of which measured fine
    status: str = ""
    best: bool = False

    @property
    def has_value(self) -> bool:
        return self.n_ok > 0 and math.isfinite(self.mean)

    def text(self) -> str:
        if self.n == 0:
            return "–"
        if not self.has_value:
            return {"skipped": "n/a"}.get(self.status, self.status or "–")
        extra = [x for x in (self.range, "" if self.n_ok == self.n else f"{self.n_ok}/{self.n} ok") if x]
        return format_number(self.mean) + (f" ({'; '.join(extra)})" if extra else "")


@dataclass
class GridTable:
    model: str
    quant: str
    dataset: str
    calib: str  # calibration source of the calibrated recipes ("none" when all are calibration-free)
    transforms: list[str]
    roundings: list[str]
    cells: dict[tuple[str, str], GridCell]
    fp16: GridCell
    rtn: GridCell
    caption: str
    notes: list[str] = field(default_factory=list)

    def cell(self, transform: str, rounding: str) -> GridCell:
        return self.cells.get((transform, rounding), GridCell())


def with_stages(d: pd.DataFrame) -> pd.DataFrame:
    """Rows with ``transform``/``range``/``rounding`` filled: the recorded stage columns, else parsed from the
    method name; "" for whole methods (fp16, pbllm) and names that are no recipe."""
    d = d.copy()
    for c in STAGES:
        d[c] = d[c].astype(object).where(d[c].notna(), "").astype(str) if c in d.columns else ""
    missing = (d[list(STAGES)] == "").any(axis=1)
    if missing.any():
        from ptqbench.recipe import parse_recipe  # imports torch: only for results without stage columns

        parsed = {}
        for m in d.loc[missing, "method"].unique():
            try:
                s = parse_recipe(m)
                parsed[m] = (s.transform, s.range, s.rounding)
            except ConfigError:
                parsed[m] = ("", "", "")
        for i, c in enumerate(STAGES):
            d.loc[missing, c] = d.loc[missing, "method"].map(lambda m, i=i: parsed[m][i])
    return d


def _order(names: set[str], first: tuple[str, ...]) -> list[str]:
    return [n for n in first if n in names] + sorted(names - set(first))


def _calib_labels(d: pd.DataFrame) -> pd.Series:
    """The calibration source, plus n x seqlen where one source was used with several sizes."""
    def num(x: float) -> str:
        return "?" if pd.isna(x) else str(int(x))

    size = d["calib_n"].map(num) + "x" + d["calib_seqlen"].map(num)
    varies = size.groupby([d["model"], d["calib"]]).transform("nunique") > 1
    return d["calib"].where(~varies | (d["calib"] == "none"), d["calib"] + " (" + size + ")")


def _seed_mean(g: pd.DataFrame, what: str) -> GridCell:
    """Mean over the seed replicates of one recipe, refusing two cells with the same seed."""
    per_cell = g.drop_duplicates("config_hash")
    seeds = per_cell["seed"].fillna(-1)
    if seeds.duplicated().any():
        dup = per_cell[seeds.duplicated(keep=False)]["config_hash"].tolist()
        raise ResultsError(f"cells {', '.join(dup)} all fill {what} with the same seed: they differ in a setting "
                           "the grid does not show; filter the results first")
    ok = per_cell[(per_cell["status"] == "ok") & np.isfinite(per_cell["value"])]
    statuses = set(per_cell["status"])
    status = "ok" if len(ok) else next((s for s in ("failed", "diverged", "skipped") if s in statuses), "diverged")
    return GridCell(float(ok["value"].mean()) if len(ok) else math.nan, n=len(per_cell), n_ok=len(ok),
                    status=status)


def _entry(g: pd.DataFrame, what: str) -> GridCell:
    """The best range of one (transform, rounding): lowest mean perplexity; without any value, the worst status."""
    by_range = {r: _seed_mean(gr, f"{what} (range {r})") for r, gr in g.groupby("range")}
    for r, c in by_range.items():
        c.range = r
    valued = [c for c in by_range.values() if c.has_value]
    if valued:
        return min(valued, key=lambda c: (c.mean, c.range))
    statuses = {c.status for c in by_range.values()}
    status = next(s for s in ("failed", "diverged", "skipped", "ok") if s in statuses)
    return GridCell(n=sum(c.n for c in by_range.values()), status=status)


def grid_tables(df: pd.DataFrame) -> list[GridTable]:
    """One GridTable per (model, scheme, eval dataset[, calibration source]) of the recipe rows' perplexities."""
    d = with_stages(prepare(df))
    failed = d[(d["metric"] == "cell") & (d["status"] == "failed")]  # a cell that raised: one row, no metrics
    ppl = d[d["metric"] == "perplexity"]
    places = ppl[["model", "dataset"]].drop_duplicates()  # a failed cell shows as failed on every dataset
    failed = failed.drop(columns=["metric", "dataset"]).merge(places, on="model").assign(metric="perplexity")
    d = pd.concat([ppl, failed], ignore_index=True)
    d = d.assign(calib_label=_calib_labels(d))
    recipe = d[d["transform"] != ""]
    if recipe.empty:
        raise ResultsError("the results hold no perplexity of a recipe (transform+range+rounding method): "
                           "nothing to put in a transform x rounding grid")
    fp16_rows = d[d["method"] == "fp16"]
    tables = []
    for (model, quant, dataset), m in recipe.groupby(["model", "quant", "dataset"], sort=True):
        fp16 = fp16_rows[(fp16_rows["model"] == model) & (fp16_rows["dataset"] == dataset)]
        for calib in sorted(set(m["calib_label"]) - {"none"}) or ["none"]:
            g = m[m["calib_label"].isin([calib, "none"])]
            where = f"model {model}, column '{quant} · PPL {dataset} ↓'" + (f" (calib {calib})" * (calib != "none"))
            check_protocol(pd.concat([g, fp16]), where)
            cells = {(t, q): _entry(gc, f"{where}, {t} x {q}") for (t, q), gc in g.groupby(["transform", "rounding"])}
            valued = [c for c in cells.values() if c.has_value]
            if len(valued) > 1:  # a lone value is not "best" of anything
                low = min(c.mean for c in valued)
                for c in valued:
                    c.best = bool(np.isclose(c.mean, low, rtol=1e-12, atol=0.0))
            ref_fp16 = _seed_mean(fp16, f"{where}, fp16") if len(fp16) else GridCell()
            rtn_rows = g[(g["transform"] == RTN[0]) & (g["range"] == RTN[1]) & (g["rounding"] == RTN[2])]
            ref_rtn = _seed_mean(rtn_rows, f"{where}, RTN") if len(rtn_rows) else GridCell()
            refs = "; ".join(f"{name} {c.text() if c.n else 'not measured'}"
                             for name, c in (("fp16", ref_fp16), (f"RTN ({'+'.join(RTN)})", ref_rtn)))
            cal = f", calibrated on {calib}" if calib != "none" else ""
            ns = ", ".join(map(str, sorted({c.n_ok for c in cells.values() if c.n_ok > 1})))
            seeds = f" Entries with several seeds are the mean over seeds (n = {ns})." if ns else ""
            caption = (f"{model}, {quant}, perplexity on {dataset}{cal} (lower is better): rows transform, columns "
                       f"rounding, each entry the best over the range choices (winning range in parentheses), best "
                       f"entry in bold. References: {refs}.{seeds}")
            protos = sorted(set(pd.concat([g, fp16])["protocol"]) - {""})
            notes = [f"PPL protocol: {p}" for p in protos]
            notes += [f"failed: {r.method} (calib {r.calib}): {r.error[:120] or 'no error recorded'}"
                      for r in g[g["status"] == "failed"].drop_duplicates("config_hash").itertuples(index=False)]
            tables.append(GridTable(str(model), str(quant), str(dataset), calib,
                                    _order(set(g["transform"]), TRANSFORM_ORDER),
                                    _order(set(g["rounding"]), ROUNDING_ORDER), cells, ref_fp16, ref_rtn, caption,
                                    notes))
    return tables


# --- rendering ---------------------------------------------------------------------------------------------------

def _frame(t: GridTable, fmt: str) -> pd.DataFrame:
    def show(c: GridCell) -> str:
        txt = latex_escape(c.text()) if fmt == "latex" else c.text()
        return (rf"\textbf{{{txt}}}" if fmt == "latex" else f"**{txt}**") if c.best else txt

    corner = r"transform $\backslash$ rounding" if fmt == "latex" else "transform \\ rounding"
    esc = latex_escape if fmt == "latex" else str
    return pd.DataFrame([[esc(tr)] + [show(t.cell(tr, q)) for q in t.roundings] for tr in t.transforms],
                        columns=[corner] + [esc(q) for q in t.roundings])


def _title(t: GridTable) -> str:
    return f"{t.model} · {t.quant} · PPL {t.dataset}" + (f" · calib {t.calib}" if t.calib != "none" else "")


def _render_markdown(t: GridTable) -> str:
    body = _frame(t, "md").to_markdown(index=False, disable_numparse=True)
    notes = "".join(f"- {n}\n" for n in t.notes)
    return f"### {_title(t)}\n\n{body}\n\nTable: {t.caption}\n\n{notes}"


def _render_latex(t: GridTable) -> str:
    caption = latex_escape(t.caption) + "".join(" " + latex_escape(n) + "." for n in t.notes)
    label = "tab:grid-" + slug(f"{t.model}-{t.quant}-{t.dataset}" + ("" if t.calib == "none" else f"-{t.calib}"))
    return _frame(t, "latex").to_latex(index=False, escape=False, column_format="l" + "r" * len(t.roundings),
                                       caption=(caption, latex_escape(_title(t))), label=label.lower())


GRID_FORMATS = {"md": (_render_markdown, "md"), "latex": (_render_latex, "tex")}


def render_grid(table: GridTable, fmt: str = "md") -> str:
    """Render a grid as ``md`` (best entry in **bold**) or ``latex`` (booktabs, \\textbf)."""
    if fmt not in GRID_FORMATS:
        raise ConfigError(f"the grid has no {fmt!r} format: use one of {', '.join(GRID_FORMATS)}")
    return GRID_FORMATS[fmt][0](table)


def write_grids(df: pd.DataFrame, out: Path, fmt: str = "md") -> list[Path]:
    """Write ``grid_<model>_<scheme>.<ext>`` under ``out`` (one file per model and scheme, its datasets' grids in
    it); returns the paths written."""
    if fmt not in GRID_FORMATS:
        raise ConfigError(f"the grid has no {fmt!r} format: use one of {', '.join(GRID_FORMATS)}")
    files: dict[Path, list[str]] = {}
    for t in grid_tables(df):
        path = out / f"grid_{slug(t.model)}_{slug(t.quant)}.{GRID_FORMATS[fmt][1]}"
        files.setdefault(path, []).append(render_grid(t, fmt))
    out.mkdir(parents=True, exist_ok=True)
    for path, parts in files.items():
        path.write_text("\n\n".join(parts))
    return list(files)
