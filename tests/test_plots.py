"""Figures: written as PNG and PDF, non-trivial in size and pixels, and only where there is data to draw."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd

from ptqbench.plots import calib_shift_figure, latency_figure, pareto_frontier
from ptqbench.report import main as report_main
from ptqbench.results import to_frame, write_cell

PPL = "ppl:concat-windows;split=eval;seq_len=512;windows=40;tokens=20480"


def results(latency: bool = True) -> pd.DataFrame:
    rows = []

    def cell(method, family, quant, bits, calib, seed, ppl: dict, lat=None):
        base = dict(model="tiny-lm", method=method, family=family, quant=quant, w_bits=bits, a_bits=16,
                    group_size=64, calib=calib, seed=seed, config_hash=f"{method}-{quant}-{calib}-{seed}", group="",
                    status="ok")
        rows.extend(dict(base, metric="perplexity", dataset=ds, value=v, protocol=PPL) for ds, v in ppl.items())
        rows.append(dict(base, metric="effective_bits", dataset="", value=bits + 0.5 if bits < 16 else 16.0))
        if lat is not None:
            rows.append(dict(base, metric="latency_us", dataset="4096x11008", value=lat, unit="us"))

    cell("fp16", "baseline", "fp16", 16, "none", None, {"docs": 16.0, "code": 9.0, "prose": 20.0},
         27.0 if latency else None)
    for bits, ppl, lat in [(4, 21.0, 7.4), (3, 48.0, 5.5), (2, 4e5, 3.8)]:  # W2 RTN diverges: a log axis
        cell("rtn", "calibration-free", f"w{bits}g64", bits, "none", None,
             {"docs": ppl, "code": ppl * 0.6, "prose": ppl * 1.3}, lat if latency else None)
    for calib, shift in [("docs", 0.0), ("code", 3.0), ("prose", 2.0)]:  # the calibration-shift grid
        for seed in (0, 1):
            cell("gptq", "compensation", "w4g64", 4, calib, seed,
                 {"docs": 17.5 + shift + seed * 0.1, "code": 10.0 + (0 if calib == "code" else 1.0),
                  "prose": 22.0 + (0 if calib == "prose" else 1.5)})
        cell("gptq", "compensation", "w3g64", 3, calib, 0, {"docs": 25.0 + shift, "code": 14.0, "prose": 30.0})
    return to_frame(rows)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # IHDR: width, height


def test_report_writes_all_figures(tmp_path):
    df = results()
    for h, g in df.groupby("config_hash"):
        write_cell(tmp_path / "res", h, g.to_dict("records"))
    out = tmp_path / "out"
    assert report_main([str(tmp_path / "res"), "--out", str(out)]) == 0  # plots go into --out/plots
    assert (out / "leaderboard_tiny-lm.md").exists()
    paths = sorted((out / "plots").iterdir())
    assert [p.name for p in paths] == sorted(f"{n}_tiny-lm.{ext}" for n in ("pareto", "calib_shift", "latency")
                                             for ext in ("png", "pdf"))
    for p in paths:
        assert p.stat().st_size > 15_000, f"{p} is suspiciously small"
        if p.suffix == ".png":
            w, h = png_size(p)
            assert w >= 700 and h >= 400, f"{p}: {w}x{h} px is too small for a paper figure"
        else:
            assert p.read_bytes()[:5] == b"%PDF-"


def test_figures_only_where_there_is_data():
    df = results(latency=False)
    assert latency_figure(df, "tiny-lm") is None  # nothing timed (e.g. no GPU): no latency figure
    assert latency_figure(df, "another-model") is None
    no_shift = df[df["calib"].isin(["none", "docs"])]
    assert calib_shift_figure(no_shift, "tiny-lm") is None  # one calibration source per method: no heatmap


def test_pareto_frontier():
    bits = np.array([16.0, 4.5, 4.5, 3.5, 2.5, 3.5])
    ppl = np.array([16.0, 21.0, 19.0, 48.0, 4e5, 60.0])
    # by bits: 2.5 (4e5) < 3.5 (48) < 4.5 (19) < 16 (16); 4.5@21 and 3.5@60 are dominated
    assert list(pareto_frontier(bits, ppl)) == [4, 3, 2, 0]


def test_bits_axis_ticks_whole_bit_widths():
    """Effective bits 4.03 / 4.31 / 4.5 used to get three overlapping tick labels; the axis ticks whole widths."""
    import matplotlib.pyplot as plt

    from ptqbench.plots import _bits_axis

    fig, ax = plt.subplots()
    _bits_axis(ax, pd.Series([2.281, 2.985, 3.297, 3.5, 4.029, 4.312, 4.5, 8.023, 16.0]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "3", "4", "8", "16"]
    lo, hi = ax.get_xlim()
    assert lo < 2.281 and hi > 16.0
    plt.close(fig)
