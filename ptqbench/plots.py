"""Figures from the results store, sized and lettered for a paper page (PNG and PDF).

- ``pareto_<model>``: perplexity versus effective bits per method, one panel per evaluation domain, with the
  Pareto frontier (no other point has both fewer bits and a lower perplexity);
- ``calib_shift_<model>``: per method and scheme, perplexity by calibration domain (rows) x evaluation domain
  (columns), for the methods measured with more than one calibration source;
- ``latency_<model>``: kernel latency versus weight bits, where latency was measured.

Seed replicates are averaged. Only rows with status ``ok`` and a finite value are drawn.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI machines or GPU hosts

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ptqbench.tables import prepare, scheme_bits, slug  # noqa: E402

# Paper size: a two-column figure is ~7 in wide; 8-9 pt text stays readable when printed at that width.
PAPER_RC = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 7.5, "legend.title_fontsize": 8, "lines.markersize": 5, "axes.grid": True,
    "grid.alpha": 0.3, "savefig.bbox": "tight", "pdf.fonttype": 42,  # TrueType in PDFs: editable, accepted by venues
}
FULL_WIDTH_IN = 7.0
PANEL_HEIGHT_IN = 2.6
MARKERS = "osD^vP*Xh<>p"


def _ok(d: pd.DataFrame) -> pd.DataFrame:
    return d[(d["status"] == "ok") & np.isfinite(d["value"])]


def _spans_decades(values: np.ndarray, factor: float = 10.0) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return len(v) > 0 and v.max() / v.min() >= factor


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _styles(d: pd.DataFrame) -> dict[str, dict]:
    """A colour per method and a marker per taxonomy family, fixed over all of a model's methods so that every
    figure of that model draws a method alike."""
    families = dict(zip(d["method"], d["family"]))
    methods = list(families)
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    fams = sorted(set(families.values()))
    return {m: {"color": cmap(i % cmap.N), "marker": MARKERS[fams.index(families[m]) % len(MARKERS)]}
            for i, m in enumerate(sorted(methods))}


def _bits_axis(ax, bits: pd.Series) -> None:
    """Log-2 bits axis ticked at the whole bit-widths near the points (2, 3, 4, 8, 16): effective bits such as 4.03,
    4.31 and 4.5 would otherwise print overlapping labels; a point's exact value is in the tables."""
    ax.set_xscale("log", base=2)
    values = [float(b) for b in bits]
    ticks: list[int] = []
    for t in sorted({max(1, round(b)) for b in values}):
        if not ticks or np.log2(t / ticks[-1]) >= 0.3:  # keep labels apart (3 and 4 are 0.42 apart)
            ticks.append(t)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(min(min(values), ticks[0]) / 1.15, max(max(values), ticks[-1]) * 1.15)


def _width(n_cols: int) -> float:
    return min(FULL_WIDTH_IN, 2.7 * n_cols + 1.2)


def pareto_frontier(bits: np.ndarray, ppl: np.ndarray) -> np.ndarray:
    """Indices of the points no other point dominates (fewer or equal bits and lower perplexity), by bits."""
    order = np.lexsort((ppl, bits))
    front, best = [], math.inf
    for i in order:
        if ppl[i] < best:
            front.append(i)
            best = ppl[i]
    return np.asarray(front, dtype=int)


def _cell_points(m: pd.DataFrame) -> pd.DataFrame:
    """Per cell: effective bits (falling back to the scheme's weight bits) next to each perplexity."""
    ppl = _ok(m[m["metric"] == "perplexity"])
    if ppl.empty:
        return ppl
    bits = _ok(m[m["metric"] == "effective_bits"]).groupby("config_hash")["value"].first()
    ppl = ppl.assign(bits=ppl["config_hash"].map(bits))
    fallback = ppl.apply(scheme_bits, axis=1)
    ppl["bits"] = ppl["bits"].fillna(fallback)
    keys = ["method", "family", "quant", "calib", "dataset"]
    return (ppl.dropna(subset=["bits"]).groupby(keys, as_index=False)
            .agg(bits=("bits", "mean"), ppl=("value", "mean")))


def pareto_figure(df: pd.DataFrame, model: str) -> Figure | None:
    """Perplexity versus effective bits for one model, a panel per evaluation domain; None without data."""
    m = prepare(df).query("model == @model")
    pts = _cell_points(m)
    if pts.empty:
        return None
    datasets = sorted(pts["dataset"].unique())
    styles = _styles(m)
    nr, nc = _grid(len(datasets))
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(nr, nc, figsize=(_width(nc), PANEL_HEIGHT_IN * nr + 0.5),
                                 squeeze=False, constrained_layout=True)
        for ax, ds in zip(axes.flat, datasets):
            p = pts[pts["dataset"] == ds]
            for method, g in p.groupby("method"):
                ax.scatter(g["bits"], g["ppl"], label=method, zorder=3, edgecolors="black", linewidths=0.4,
                           **styles[method])
            front = p.iloc[pareto_frontier(p["bits"].to_numpy(), p["ppl"].to_numpy())]
            ax.step(front["bits"], front["ppl"], where="post", color="black", ls="--", lw=1, zorder=2,
                    label="Pareto frontier")
            _bits_axis(ax, p["bits"])
            if _spans_decades(p["ppl"].to_numpy()):
                ax.set_yscale("log")
            ax.set_title(f"eval: {ds}" if ds else model)
            ax.set_xlabel("effective bits per weight")
            ax.set_ylabel("perplexity ↓")
        for ax in list(axes.flat)[len(datasets):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
        fig.suptitle(f"{model}: perplexity vs. effective bits")
    return fig


def calib_shift_figure(df: pd.DataFrame, model: str) -> Figure | None:
    """Heatmaps of perplexity, calibration domain x evaluation domain, per (method, scheme) with >1 calib source."""
    d = _ok(prepare(df).query("model == @model and metric == 'perplexity' and calib != 'none'"))
    panels = [(k, g) for k, g in d.groupby(["method", "quant"]) if g["calib"].nunique() > 1]
    if not panels:
        return None
    nr, nc = _grid(len(panels))
    with plt.rc_context(PAPER_RC | {"axes.grid": False}):
        fig, axes = plt.subplots(nr, nc, figsize=(_width(nc) + 0.6, 2.4 * nr + 0.4), squeeze=False,
                                 constrained_layout=True)
        for ax, ((method, quant), g) in zip(axes.flat, panels):
            grid = g.pivot_table(index="calib", columns="dataset", values="value", aggfunc="mean")
            vals = grid.to_numpy(dtype=float)
            norm = LogNorm(np.nanmin(vals), np.nanmax(vals)) if _spans_decades(vals.ravel()) else Normalize(
                np.nanmin(vals), np.nanmax(vals))
            im = ax.imshow(vals, cmap="viridis_r", norm=norm, aspect="auto")
            ax.set_xticks(range(grid.shape[1]), grid.columns)
            ax.set_yticks(range(grid.shape[0]), grid.index)
            ax.set_xlabel("evaluation domain")
            ax.set_ylabel("calibration domain")
            ax.set_title(f"{method} {quant}")
            mid = norm(np.nanmean(vals))
            for (i, j), v in np.ndenumerate(vals):
                if np.isfinite(v):  # dark text on light cells and the other way round
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7.5,
                            color="white" if norm(v) > mid else "black")
                if grid.index[i] == grid.columns[j]:  # in-domain calibration: outline it
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
            fig.colorbar(im, ax=ax, shrink=0.85, label="perplexity")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{model}: calibration shift (red box: calibrated in the evaluation domain)")
    return fig


def latency_figure(df: pd.DataFrame, model: str) -> Figure | None:
    """Kernel latency versus weight bits per method, a panel per measured shape; None where nothing was timed."""
    d = prepare(df)
    d = _ok(d[(d["model"] == model) & d["metric"].str.startswith("latency")])
    if d.empty:
        return None
    styles = _styles(prepare(df).query("model == @model"))
    d = d.assign(bits=d.apply(scheme_bits, axis=1)).dropna(subset=["bits"])
    pts = d.groupby(["method", "family", "dataset", "bits"], as_index=False)["value"].mean()
    unit = next((u for u in d["unit"] if u), "us")
    shapes = sorted(pts["dataset"].unique())
    nr, nc = _grid(len(shapes))
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(nr, nc, figsize=(_width(nc), PANEL_HEIGHT_IN * nr + 0.5),
                                 squeeze=False, constrained_layout=True)
        for ax, shape in zip(axes.flat, shapes):
            p = pts[pts["dataset"] == shape]
            for method, g in p.groupby("method"):
                g = g.sort_values("bits")
                ax.plot(g["bits"], g["value"], label=method, **styles[method])
            _bits_axis(ax, p["bits"])
            if _spans_decades(p["value"].to_numpy()):
                ax.set_yscale("log")
            ax.set_xlabel("weight bits")
            ax.set_ylabel(f"latency ({unit}) ↓")
            ax.set_title(shape or model)
        for ax in list(axes.flat)[len(shapes):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
        fig.suptitle(f"{model}: kernel latency vs. bits")
    return fig


def save(fig: Figure, stem: Path, dpi: int = 200) -> list[Path]:
    """Save as ``stem.png`` and ``stem.pdf``, close the figure, return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return paths


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for embedding in HTML); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


FIGURES = {"pareto": pareto_figure, "calib_shift": calib_shift_figure, "latency": latency_figure}


def write_plots(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write every figure that has data, per model, as PNG and PDF under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    written: list[Path] = []
    for model in sorted(prepare(df)["model"].unique()):
        for name, make in FIGURES.items():
            fig = make(df, model)
            if fig is not None:
                written += save(fig, out / f"{name}_{slug(model)}")
    return written
