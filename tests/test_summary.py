"""Seed confidence intervals, the calibration-shift matrix, and that seeds draw different calibration sets."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ptqbench import data, results, summary


def test_t_interval_known_numbers():
    mean, sd, half = summary.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and sd == 1.0
    assert half == pytest.approx(4.302652729911275 / math.sqrt(3))  # t_{0.975, 2} * sd / sqrt(n)
    assert math.isnan(summary.t_interval([5.0])[2])


def _row(method, calib, seed, metric, dataset, value, family=None):
    family = family or {"fp16": "baseline", "rtn": "calibration-free"}.get(method, "compensation")
    return {"model": "m", "method": method, "family": family, "w_bits": 3, "a_bits": 16, "group_size": 64,
            "sym": False, "quant": "w3g64", "calib": calib, "calib_n": 4, "calib_seqlen": 64, "seed": seed,
            "calib_fingerprint": f"fp{method}{calib}{seed}", "metric": metric, "dataset": dataset, "group": "",
            "value": value, "unit": "ppl", "status": "ok", "error": "", "protocol": "p",
            "config_hash": f"h{method}{calib}{seed}", "sweep": "s", "git_sha": "g", "versions": "v",
            "device": "cpu", "wall_s": 1.0 + seed, "timestamp": f"t{seed}"}


def test_seed_summary_groups_all_but_seed():
    rows = [_row("gptq", "docs", s, "perplexity", "docs", v) for s, v in zip((0, 1, 2), (1.0, 2.0, 3.0))]
    rows += [_row("gptq", "docs", s, "perplexity", "code", v) for s, v in zip((0, 1, 2), (10.0, 10.0, 13.0))]
    rows += [_row("rtn", "none", 0, "perplexity", "docs", 7.0)]  # deterministic: one cell whatever the seeds
    rows += [{**_row("gptq", "docs", 3, "perplexity", "docs", 100.0), "status": "diverged"}]  # not averaged
    s = summary.seed_summary(pd.DataFrame(rows)).set_index(["method", "dataset"])
    g = s.loc[("gptq", "docs")]
    assert g["n"] == 3 and g["seeds"] == "0,1,2" and g["mean"] == 2.0 and g["sd"] == 1.0
    assert g["ci_half"] == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert g["ci_lo"] == pytest.approx(2.0 - g["ci_half"]) and g["ci_hi"] == pytest.approx(2.0 + g["ci_half"])
    assert s.loc[("gptq", "code")]["mean"] == 11.0 and s.loc[("gptq", "code")]["sd"] == pytest.approx(math.sqrt(3))
    r = s.loc[("rtn", "docs")]
    assert r["n"] == 1 and r["mean"] == 7.0 and math.isnan(r["sd"])
    assert len(s) == 3


def _shift_frame():
    rows = []
    fp = {"docs": 10.0, "code": 4.0}
    for d, v in fp.items():
        rows.append(_row("fp16", "none", 0, "perplexity", d, v))
    # rtn ignores calibration; gptq: in-distribution better than out of distribution
    gptq = {("docs", "docs"): 12.0, ("docs", "code"): 6.0, ("code", "docs"): 15.0, ("code", "code"): 5.0,
            ("mix", "docs"): 13.0, ("mix", "code"): 5.2}
    for (c, d), v in gptq.items():
        for seed, off in ((0, -0.5), (1, 0.5)):  # two seeds: the matrix holds their mean
            rows.append(_row("gptq", c, seed, "perplexity", d, v + off))
    rows.append(_row("gptq", "docs", 0, "acc", "docs", 0.5))  # other metrics are ignored
    return pd.DataFrame(rows)


def test_shift_matrix():
    out = summary.shift_matrix(_shift_frame())
    assert list(out) == [("m", "gptq", "w3g64")]
    f = out[("m", "gptq", "w3g64")]
    v = f["value"]
    assert list(v.index) == ["code", "docs", "mix", "fp16"] and list(v.columns) == ["code", "docs"]
    assert v.at["docs", "code"] == 6.0 and v.at["fp16", "docs"] == 10.0
    deg = f["degradation"]
    assert deg.at["docs", "docs"] == pytest.approx(0.2) and deg.at["code", "docs"] == pytest.approx(0.5)
    io = f["id_vs_ood"]
    assert io.at["docs", "in_dist"] == pytest.approx(0.2) and io.at["docs", "out_of_dist"] == pytest.approx(0.5)
    assert io.at["code", "in_dist"] == pytest.approx(0.25) and io.at["code", "out_of_dist"] == pytest.approx(0.5)
    assert io.at["code", "calib=mix"] == pytest.approx(0.3)


def test_cli(tmp_path, capsys):
    df = _shift_frame()
    for h, g in df.groupby("config_hash"):
        results.write_cell(tmp_path, h, g.to_dict("records"))
    assert summary.main(["shift", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "in_dist" in out and "out_of_dist" in out and "gptq" in out
    assert summary.main(["seeds", str(tmp_path), "--metric", "perplexity"]) == 0
    out = capsys.readouterr().out
    assert "ci_half" in out
    assert summary.main(["seeds", str(tmp_path / "missing")]) == 2


class _CharTokenizer:
    """One id per character: enough to draw calibration windows without loading a model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 4096 for c in text]}


def test_seeds_draw_different_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path))  # the token cache of this fake tokenizer stays here
    spec = data.CalibSpec("docs", (("docs", 1.0),), n_samples=4, seq_len=64)
    tok = _CharTokenizer()
    fps = [data.draw_calibration(spec, s, tok, "chars").fingerprint for s in (0, 1, 2)]
    assert len(set(fps)) == 3
    assert data.draw_calibration(spec, 1, tok, "chars").fingerprint == fps[1]  # and a seed is reproducible
