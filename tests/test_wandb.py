"""The W&B logger against the real wandb package in offline mode: read back what the offline runs recorded."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptqbench.errors import ConfigError, UnavailableError
from ptqbench.loggers import NullLogger, WandbLogger, make_logger
from ptqbench.results import to_frame

wandb = pytest.importorskip("wandb", reason="wandb is an optional extra: pip install wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

CFG = {"name": "wandb", "project": "ptqbench-test", "mode": "offline", "entity": None, "dir": None, "group": None,
       "tags": ["ci"]}


def read_records(path: Path) -> list[pb.Record]:
    """Records of an offline ``run-*.wandb`` file.

    The file is W&B's transaction log: a 7-byte file header (":W&B", magic, version), then 32 KiB blocks of
    chunks, each with a 7-byte header (checksum, length, type: full / first / middle / last); a block's tail
    shorter than a chunk header is zero padding. The payloads are ``wandb_internal.Record`` protobufs.
    """
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # padding at the end of a block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            continue
        buf += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):  # full or last chunk: a record is complete
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def run_contents(run_dir: Path) -> dict:
    """The run's name, group, job type, tags, config and final summary, from its transaction log."""
    (log,) = run_dir.glob("run-*.wandb")
    records = read_records(log)
    # the logger tears the W&B service down at finish_sweep, which flushes every run: the log must be complete
    assert "exit" in [r.WhichOneof("record_type") for r in records], f"{log} has no exit record: not flushed"
    info: dict = {"config": {}, "summary": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type,
                        tags=list(rec.run.tags), project=rec.run.project)
            info["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            info["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            for u in rec.summary.update:
                info["summary"]["/".join(u.nested_key) if u.nested_key else u.key] = json.loads(u.value_json)
    return info


def cell_rows(method: str, ppl: float, status: str = "ok") -> list[dict]:
    base = dict(model="tiny", method=method, family="compensation", quant="w4g64", calib="docs", seed=0,
                config_hash=f"h-{method}", group="", protocol="ppl:concat-windows;seq_len=512", wall_s=1.5)
    return [dict(base, metric="perplexity", dataset="docs", value=ppl, status=status),
            dict(base, metric="effective_bits", dataset="", value=4.5, status="ok"),
            dict(base, metric="latency_us", dataset="4096x11008", value=float("nan"), status="skipped")]


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_offline_runs_hold_config_metrics_and_table(offline_env):
    # the run loop hands over OmegaConf nodes (Hydra); plain dicts work the same
    logger = make_logger(OmegaConf.create(CFG), "sweepA", offline_env / "results")
    assert isinstance(logger, WandbLogger)
    rows_g, rows_r = cell_rows("gptq", 21.5), cell_rows("rtn", float("nan"), status="diverged")
    logger.log_cell(OmegaConf.create({"method": {"name": "gptq", "damp": 0.01}, "quant": "w4g64", "calib": "docs",
                                      "seed": 0}), rows_g)
    logger.log_cell({"method": {"name": "rtn"}, "quant": "w4g64", "seed": 0}, rows_r)
    logger.finish_sweep(to_frame(rows_g + rows_r))

    runs = sorted((offline_env / "wandb").glob("offline-run-*"))
    assert len(runs) == 3, runs
    contents = {c["name"]: dict(c, dir=run) for run in runs for c in [run_contents(run)]}
    assert set(contents) == {"gptq-w4g64-docs-s0", "rtn-w4g64-docs-s0", "sweepA-results"}

    g = contents["gptq-w4g64-docs-s0"]
    assert g["group"] == "sweepA" and g["job_type"] == "cell" and g["project"] == "ptqbench-test"
    assert {"ci", "gptq", "w4g64", "compensation"} <= set(g["tags"])
    assert g["config"]["method"] == {"name": "gptq", "damp": 0.01} and g["config"]["quant"] == "w4g64"
    assert g["summary"]["perplexity/docs"] == 21.5
    assert g["summary"]["effective_bits"] == 4.5
    assert g["summary"]["status/latency_us/4096x11008"] == "skipped"
    assert g["summary"]["cell/status"] == "skipped" and g["summary"]["cell/config_hash"] == "h-gptq"

    r = contents["rtn-w4g64-docs-s0"]
    assert r["summary"]["status/perplexity/docs"] == "diverged" and "perplexity/docs" not in r["summary"]
    assert r["summary"]["cell/status"] == "diverged"

    s = contents["sweepA-results"]
    assert s["group"] == "sweepA" and s["summary"]["sweep/cells"] == 2 and s["summary"]["sweep/rows"] == 6
    (table_file,) = (s["dir"] / "files" / "media" / "table").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    assert "method" in table["columns"] and "value" in table["columns"]
    assert len(table["data"]) == 6
    col = table["columns"].index
    assert [21.5, "gptq"] in [[row[col("value")], row[col("method")]] for row in table["data"]]


def test_none_logger_and_defaults(tmp_path):
    assert isinstance(make_logger(None, "s", tmp_path), NullLogger)
    assert isinstance(make_logger({"name": "none"}, "s", tmp_path), NullLogger)
    NullLogger().log_cell({}, [])  # does nothing, raises nothing
    NullLogger().finish_sweep(to_frame([]))


def test_bad_logger_configs(tmp_path):
    with pytest.raises(ConfigError, match="not known"):
        make_logger({"name": "mlflow"}, "s", tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        make_logger(dict(CFG, projcet="x"), "s", tmp_path)
    with pytest.raises(ConfigError, match="mode"):
        make_logger(dict(CFG, mode="sometimes"), "s", tmp_path)


def test_missing_wandb_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if it were not installed
    with pytest.raises(UnavailableError, match="pip install wandb") as e:
        make_logger(CFG, "s", tmp_path)
    assert "\n" not in str(e.value)
