"""Kill a sweep at random points, resume it, and count what the results store lost.

    .venv/bin/python scripts/fault_kills.py [--kills 20] [--seed 0] [--root /tmp/fault_kills]

Runs the cheap smoke sweep (fp16 and RTN at several schemes, one evaluation window per domain) once without
interruption as the reference, then, on a second folder, starts it again and again, each time SIGKILLing the whole
process group at a seeded random point (after a random number of new cell files, plus a random delay), and finally
lets one run finish (a new folder whenever one is complete, so that kills keep landing inside cells). Prints the figure: cells lost, corrupt or duplicated, leftover temporary and claim files, and
values that differ from the reference (there must be none of any). ``tests/test_faults.py`` uses the same helpers
with fewer kills.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqbench import results  # noqa: E402

# fp16 plus RTN at four schemes: five cells of about a second each (one 128-token window of prose, the o_proj
# linears quantized, the rest kept in floating point), no calibration
SWEEP = ["+sweep=smoke", "eval.perplexity.max_windows=1", "eval.perplexity.datasets=[prose]",
         "quant.keep_fp=[lm_head,mlp,q_proj,k_proj,v_proj]"]
METHODS, QUANTS = "fp16,rtn", "w4g64,w3g64,w2g64,w8g64"
N_CELLS = 5  # fp16 is one cell whatever the scheme


def sweep_cmd(results_root: Path, sweep_dir: Path, extra: list[str] | None = None, methods: str = METHODS,
              quants: str = QUANTS) -> list[str]:
    """``python -m ptqbench`` on the cheap smoke cells (``methods`` x ``quants``), results under results_root."""
    return [sys.executable, "-m", "ptqbench", *SWEEP, f"method={methods}", f"quant={quants}",
            f"results_root={results_root}", f"hydra.sweep.dir={sweep_dir}", *(extra or [])]


def run_sweep(results_root: Path, sweep_dir: Path, extra: list[str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """One uninterrupted sweep."""
    return subprocess.run(sweep_cmd(results_root, sweep_dir, extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def cell_files(results_dir: Path) -> list[Path]:
    d = results.cells_dir(results_dir)
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def killed_sweep(results_root: Path, sweep_dir: Path, rng: random.Random, timeout: float = 300) -> bool:
    """Start the sweep and SIGKILL it (and its children) after ``rng``'s number of new cell files (0 or 1) and a
    random delay; True when the kill landed before the sweep finished by itself."""
    results_dir = results_root / "smoke"
    before = len(cell_files(results_dir))
    new_files, delay = rng.choice([0, 1]), rng.uniform(0.0, 1.5)
    p = subprocess.Popen(sweep_cmd(results_root, sweep_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    while p.poll() is None and len(cell_files(results_dir)) < before + new_files:
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.05)
    if new_files == 0:
        delay += rng.uniform(0.0, 8.0)  # somewhere in the imports, the model load or the first cells
    deadline = time.monotonic() + delay
    while p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if p.poll() is not None:
        return False
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return True


@dataclass
class Figure:
    """What a resumed folder lacks or holds too much of, against the uninterrupted reference."""

    cells: int = 0  # cells in the reference
    lost: int = 0  # reference cells missing or not complete
    corrupt: int = 0  # unreadable cell files
    duplicate: int = 0  # extra cell files, or rows repeated within a cell
    leftovers: int = 0  # temporary and claim files left behind
    differ: int = 0  # (hash, metric, dataset, group) values unlike the reference's

    @property
    def clean(self) -> bool:
        return not (self.lost or self.corrupt or self.duplicate or self.leftovers or self.differ)


KEY = ["config_hash", "metric", "dataset", "group"]
TIMING = ("quant_time_s", "eval_time_s", "peak_host_mem_quant_gib", "peak_host_mem_eval_gib")  # vary run to run


def compare(reference: Path, resumed: Path) -> Figure:
    """The figure of ``resumed`` against ``reference`` (both results folders)."""
    ref = results.load_results(reference)
    fig = Figure(cells=ref["config_hash"].nunique())
    files = cell_files(resumed)
    frames = {}
    for f in files:
        try:
            frames[f.stem] = results.read_cell(f)
        except results.ResultsError:
            fig.corrupt += 1
    fig.duplicate = len(set(frames) - set(ref["config_hash"])) + sum(
        int(d.duplicated(KEY).sum()) for d in frames.values())
    fig.lost = sum(1 for h in ref["config_hash"].unique()
                   if results.cell_status(resumed, h) != "complete")
    cells = results.cells_dir(resumed)
    fig.leftovers = sum(1 for p in cells.iterdir() if p.name.endswith((".tmp", ".claim")))
    fig.differ = len(differing(ref, frames))
    return fig


def differing(ref, frames) -> list[tuple]:
    """Keys whose value in ``frames`` (hash -> rows) is not exactly the reference's (timings and memory excepted)."""
    import math

    got = {}
    for d in frames.values():
        for r in d.itertuples(index=False):
            got[(r.config_hash, r.metric, r.dataset, r.group)] = r.value
    out = []
    for r in ref.itertuples(index=False):
        if r.metric in TIMING:
            continue
        k = (r.config_hash, r.metric, r.dataset, r.group)
        v = got.get(k)
        same = v is not None and (v == r.value or (math.isnan(v) and math.isnan(r.value)))
        if not same and r.config_hash in frames:
            out.append(k)
    return out


def add(total: Figure, fig: Figure) -> Figure:
    return Figure(**{k: getattr(total, k) + getattr(fig, k) for k in vars(total)})


def kill_rounds(root: Path, reference: Path, rng: random.Random, kills: int,
                before_resume: Callable[[Path], None] | None = None) -> tuple[list[Figure], list[int], int]:
    """``kills`` SIGKILLs in rounds: in each, kill sweeps on one fresh folder until it is complete (a sweep then
    finishes by itself) or the kills are done, let one sweep finish (after ``before_resume(results_dir)``), and
    compare the folder with the reference. Returns each round's figure, the resumes' exit codes and the runs."""
    figures: list[Figure] = []
    exits: list[int] = []
    done = runs = 0
    while done < kills:
        res = root / f"res-{len(figures)}"
        while done < kills:
            runs += 1
            landed = killed_sweep(res, root / f"mr-{runs}", rng)
            done += landed
            print(f"run {runs}: {'killed' if landed else 'finished'}, {len(cell_files(res / 'smoke'))} cell file(s)",
                  flush=True)
            if not landed or len(cell_files(res / "smoke")) >= N_CELLS:
                break
        if before_resume is not None:
            before_resume(res / "smoke")
        exits.append(run_sweep(res, root / f"mr-resume-{len(figures)}").returncode)
        figures.append(compare(reference, res / "smoke"))
    return figures, exits, runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=Path("/tmp/ptqbench_fault_kills"))
    args = ap.parse_args(argv)
    shutil.rmtree(args.root, ignore_errors=True)
    t0 = time.perf_counter()
    ref = run_sweep(args.root / "ref", args.root / "mr-ref")
    if ref.returncode != 0:
        print(ref.stderr[-3000:], file=sys.stderr)
        return 1
    figures, exits, runs = kill_rounds(args.root, args.root / "ref" / "smoke", random.Random(args.seed), args.kills)
    fig = Figure()
    for f in figures:
        fig = add(fig, f)
    print(f"{args.kills} kills in {runs} runs over {len(figures)} resumed folder(s) (resume exits {exits}), "
          f"{time.perf_counter() - t0:.0f} s: {fig.cells} cells, lost {fig.lost}, corrupt {fig.corrupt}, duplicate "
          f"{fig.duplicate}, leftover tmp/claim files {fig.leftovers}, values unlike the uninterrupted run {fig.differ}")
    return 0 if fig.clean and not any(exits) else 1


if __name__ == "__main__":
    sys.exit(main())
