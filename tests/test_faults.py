"""Faults of a results store shared by processes: claims and their heartbeat, SIGKILL at random points and resume,
two launcher sweeps on one folder at once, corrupted cell files, a full or read-only results folder.

The subprocess tests run the cheap cells of the smoke sweep (fp16 and RTN at four schemes, one evaluation window
per domain: ``scripts/fault_kills.py``'s ``SWEEP``), about ten seconds a sweep, most of it imports.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from ptqbench import results, store, validate
from ptqbench import run as run_mod
from ptqbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fault_kills", ROOT / "scripts" / "fault_kills.py")
fk = sys.modules.setdefault("fault_kills", importlib.util.module_from_spec(_spec))  # dataclasses look it up there
_spec.loader.exec_module(fk)

FAST = store.StoreSettings(stale_after_s=1.0, heartbeat_s=0.1, poll_s=0.05)


def _rows(h: str, value: float = 1.0) -> list[dict]:
    return [{"model": "m", "method": "rtn", "family": "calibration-free", "quant": "w4g64", "w_bits": 4, "a_bits": 16,
             "group_size": 64, "sym": False, "calib": "none", "seed": 0, "metric": "perplexity", "dataset": "docs",
             "group": "", "value": value, "unit": "", "status": "ok", "protocol": "ppl", "config_hash": h}]


# ------------------------------------------------------------------------------------------------ claims
def test_a_live_claim_blocks_a_second_claimant_until_released(tmp_path):
    first = store.try_claim(tmp_path, "abc", FAST)
    assert first is not None
    owner = json.loads(store.claim_path(tmp_path, "abc").read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert store.try_claim(tmp_path, "abc", FAST) is None  # our own pid is alive: the claim is live
    time.sleep(3 * FAST.heartbeat_s + FAST.stale_after_s)  # longer than the timeout: only the heartbeat keeps it
    assert store.claim_state(tmp_path, "abc", FAST) == "live"
    first.release()
    assert not store.claim_path(tmp_path, "abc").exists()
    second = store.try_claim(tmp_path, "abc", FAST)
    assert second is not None
    second.release()


def _foreign_claim(tmp_path: Path, h: str, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = store.claim_path(tmp_path, h)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "other"}))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_a_claim_without_heartbeat_goes_stale_and_is_taken_over(tmp_path, caplog):
    _foreign_claim(tmp_path, "abc", "another-host", 1, age_s=0.0)
    assert store.claim_state(tmp_path, "abc", FAST) == "live"  # another host: only the heartbeat can tell
    _foreign_claim(tmp_path, "abc", "another-host", 1, age_s=FAST.stale_after_s + 1)
    leftover = results.cells_dir(tmp_path) / ".abc.parquet.x1y2.tmp"  # a killed writer's temporary file
    leftover.write_text("half")
    with caplog.at_level(logging.WARNING, logger="ptqbench"):
        claim = store.try_claim(tmp_path, "abc", FAST)
    assert claim is not None and "stale claim of another-host" in caplog.text
    assert not leftover.exists()
    claim.release()
    assert not list(results.cells_dir(tmp_path).glob("*.claim"))


def test_a_killed_process_claim_on_this_host_is_stale_at_once(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _foreign_claim(tmp_path, "abc", socket.gethostname(), p.pid)
    assert store.claim_state(tmp_path, "abc", store.StoreSettings()) == "stale"  # no 10-minute wait


def test_a_complete_cell_loses_the_stale_claim_of_a_writer_killed_before_releasing(tmp_path):
    results.write_cell(tmp_path, "abc", _rows("abc"))
    _foreign_claim(tmp_path, "abc", "another-host", 1, age_s=0.0)
    store.clear_stale(tmp_path, "abc", FAST)
    assert store.claim_path(tmp_path, "abc").exists()  # live: left alone
    _foreign_claim(tmp_path, "abc", "another-host", 1, age_s=FAST.stale_after_s + 1)
    store.clear_stale(tmp_path, "abc", FAST)
    assert not store.claim_path(tmp_path, "abc").exists()


def test_release_leaves_a_claim_taken_over_by_another(tmp_path, caplog):
    claim = store.try_claim(tmp_path, "abc", FAST)
    _foreign_claim(tmp_path, "abc", "another-host", 1)  # it looked stale to someone, who took it over
    with caplog.at_level(logging.WARNING, logger="ptqbench"):
        claim.release()
    assert store.claim_path(tmp_path, "abc").exists() and "taken over" in caplog.text


def test_store_settings_stay_out_of_the_hash(compose, tmp_path):
    base = ["+sweep=smoke", "method=rtn", f"results_root={tmp_path}"]
    default = run_mod.resolve(compose(base))
    changed = run_mod.resolve(compose([*base, "store.stale_after_s=5", "store.heartbeat_s=1"]))
    assert changed.store.stale_after_s == 5 and default.store.stale_after_s == 600
    assert changed.config_hash == default.config_hash
    with pytest.raises(ConfigError, match="store.heartbeat_s=700 must be below"):
        run_mod.resolve(compose([*base, "store.heartbeat_s=700"]))


def test_baseline_hash_is_the_fp16_cell_of_the_same_sweep(compose, tmp_path):
    base = ["+sweep=smoke", f"results_root={tmp_path}"]
    fp16 = run_mod.resolve(compose([*base, "method=fp16"]))
    for method in ("rtn", "gptq", "awq+gptq"):
        assert run_mod.baseline_hash(run_mod.resolve(compose([*base, f"method={method}"]))) == fp16.config_hash


def test_drop_rows_read_the_stored_fp16_baseline():
    from ptqbench.evaluators import CellContext
    from ptqbench.evaluators.tasks import Suite, _stored_values

    stored = [{"dataset": "np", "metric": "acc", "group": g, "value": v, "status": "ok"}
              for g, v in (("code", 0.5), ("docs", 0.75))]
    stored.append({"dataset": "np", "metric": "worst_group_acc", "group": "", "value": 0.5, "status": "ok"})
    ctx = CellContext(None, None, "tok", "m", "cpu", None, None, False, 0, stored_baseline=lambda: stored)
    assert _stored_values(ctx, Suite("np", ("t",))) == {"code": 0.5, "docs": 0.75}
    assert _stored_values(CellContext(None, None, "tok", "m", "cpu", None, None, False, 0,
                                      stored_baseline=lambda: None), Suite("np", ("t",))) is None


def test_each_worker_takes_its_own_gpu(monkeypatch):
    from ptqbench.models import ModelSpec

    spec = ModelSpec(name="x", path="x")
    monkeypatch.setattr(run_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run_mod.torch.cuda, "device_count", lambda: 2)
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PTQBENCH_RANK", "3")
    assert run_mod._gpu_for_this_process(spec).device == "cuda:1"
    monkeypatch.setenv("SLURM_LOCALID", "0")  # the cluster's rank wins over the job number
    assert run_mod._gpu_for_this_process(spec).device == "cuda:0"
    assert run_mod._gpu_for_this_process(ModelSpec(name="x", path="x", device="cpu")).device == "cpu"


# ------------------------------------------------------------------------------------------------ corrupt cells
def _folder_with_a_corrupt_cell(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "res"
    results.write_cell(d, "good", _rows("good"))
    bad = results.write_cell(d, "bad", _rows("bad", 2.0))
    bad.write_bytes(bad.read_bytes()[:40])  # truncated mid-file, as by a full disk or a copy cut short
    return d, bad


def test_a_corrupt_cell_is_reported_with_its_path_and_recomputed(tmp_path, caplog):
    d, bad = _folder_with_a_corrupt_cell(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ptqbench"):
        assert results.cell_status(d, "bad") == "corrupt"
        df = results.load_results(d)
    assert str(bad) in caplog.text
    assert set(df["config_hash"]) == {"good"} and df.attrs["corrupt"] == [str(bad)]
    assert results.cell_status(d, "good") == "complete"
    results.cell_path(d, "empty").write_bytes(b"")  # an empty file is no cell either
    assert results.cell_status(d, "empty") == "corrupt"


def test_readers_skip_a_corrupt_cell(tmp_path, capsys):
    from ptqbench import dashboard, report

    d, bad = _folder_with_a_corrupt_cell(tmp_path)
    assert results.main([str(d)]) == 0
    err = capsys.readouterr().err
    assert f"corrupt results file {bad} skipped" in err
    assert report.main([str(d), "--format", "md"]) == 0
    # the regression gate refuses the folder instead (exit 2, one line naming the file): comparing the rest would
    # report the corrupt cells as missing without saying why
    assert dashboard.main(["--baseline", str(d), "--current", str(d), "--out", str(tmp_path / "d.html"),
                           "--no-plots"]) == 2
    assert f"error: cannot read results file {bad}" in capsys.readouterr().err
    bad.with_name("good.parquet").write_bytes(b"PAR1")
    assert results.main([str(d)]) == 2  # nothing readable: an error naming the folder, not a traceback
    assert "no readable result files" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_is_refused_before_loading(compose, tmp_path, monkeypatch):
    class Usage:
        free = 4096

    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: Usage())
    with pytest.raises(ConfigError) as info:
        validate.check_writable(tmp_path)
    assert "full disk (4 KiB free)" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setattr(run_mod, "_model", lambda spec: pytest.fail("loaded a model for an unwritable folder"))
    with pytest.raises(ConfigError, match="full disk"):
        run_mod.run(compose(["+sweep=smoke", "method=rtn", f"results_root={tmp_path}"]))
    assert not list(tmp_path.rglob("*.claim"))


# ------------------------------------------------------------------------------------------------ processes
@pytest.fixture(scope="module")
def reference(compose, tmp_path_factory) -> Path:
    """The uninterrupted sweep, cell by cell in this process (the subprocesses' values are identical on a CPU, as
    tests/test_e2e.py's determinism test relies on too); saves a subprocess's imports."""
    tmp = tmp_path_factory.mktemp("ref")
    for method in fk.METHODS.split(","):
        for quant in fk.QUANTS.split(","):
            run_mod.run(compose([*fk.SWEEP, f"method={method}", f"quant={quant}", f"results_root={tmp}"]))
    run_mod._CACHE.clear()  # the model: the rest of this module runs in subprocesses
    assert len(fk.cell_files(tmp / "smoke")) == fk.N_CELLS
    return tmp / "smoke"


def _listing_is_clean(d: Path) -> None:
    cells = results.cells_dir(d)
    names = sorted(p.name for p in cells.iterdir())
    assert not [n for n in names if n.endswith((".tmp", ".claim"))], names
    stems = Counter(p.stem for p in cells.glob("*.parquet"))
    assert all(n == 1 for n in stems.values())
    assert {p.stem for p in cells.glob("*.csv")} == set(stems)  # each cell with its csv twin


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(reference, tmp_path):
    corrupted: list[Path] = []

    def corrupt_one(d: Path) -> None:  # and a corrupted cell: the resume must notice and recompute it
        done = fk.cell_files(d)
        if done and not corrupted:
            done[0].write_bytes(done[0].read_bytes()[:100])
            corrupted.append(done[0])

    figures, exits, runs = fk.kill_rounds(tmp_path, reference, random.Random(20), kills=5, before_resume=corrupt_one)
    assert exits == [0] * len(figures)
    for fig in figures:
        assert fig.clean and fig.cells == fk.N_CELLS, fig
    for i in range(len(figures)):
        _listing_is_clean(tmp_path / f"res-{i}" / "smoke")
    if corrupted:
        logs = "".join(p.read_text() for p in tmp_path.glob("mr-resume-*/**/*.log"))
        assert f"cannot read results file {corrupted[0]}" in logs


def _written(sweep_dirs: list[Path]) -> Counter:
    """Config hashes of the cells computed by every job of these Hydra sweep folders (their job logs)."""
    n: Counter = Counter()
    for sd in sweep_dirs:
        for log in sd.rglob("*.log"):
            n.update(re.findall(r"cell (\w+) written to", log.read_text()))
    return n


@pytest.mark.slow
def test_two_launcher_sweeps_at_once_compute_each_cell_once(reference, tmp_path):
    # both spell RTN as its recipe: composed in the workers through the recipe config source that Hydra hands them
    # with its Singleton state; joblib runs the whole sweep on two workers, submitit_local one of its cells in a
    # process of its own
    a = fk.sweep_cmd(tmp_path, tmp_path / "mr-a", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                     methods="fp16,none+minmax+nearest")
    b = fk.sweep_cmd(tmp_path, tmp_path / "mr-b", ["hydra/launcher=submitit_local"], methods="none+minmax+nearest",
                     quants=fk.QUANTS.split(",")[0])
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (a, b)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    written = _written([tmp_path / "mr-a", tmp_path / "mr-b"])
    ref_hashes = set(results.load_results(reference)["config_hash"])
    assert set(written) == ref_hashes and all(n == 1 for n in written.values()), written
    fig = fk.compare(reference, tmp_path / "smoke")
    assert fig.clean, fig
    _listing_is_clean(tmp_path / "smoke")
