"""Method benchmark (not a test): wall time and peak host memory of ``quantize()`` per method at its natural scheme.

    python scripts/bench_methods.py [--methods awq hqq smoothquant] [--n-samples 32] [--seq-len 512]
    python scripts/bench_methods.py --methods gptq gptaq rescomp foem gwq discquant --quant w3g64   (compensation)
    python scripts/bench_methods.py --methods gptq mrgptq --quant mxfp4                            (FP4)
    python scripts/bench_methods.py --methods rptq dartquant                                       (W4A4 transforms)

Each method runs on the embedded model (SmolLM2-135M) with ``n_samples`` × ``seq_len`` calibration windows from
``docs`` (the default calibration), composed through the real Hydra config and ``ptqbench.run.resolve`` exactly as a
cell would be; the timed part is what ``run`` records as ``quant_time_s``: ``quantize()`` plus, for schemes with
quantized activations, attaching the activation quantizers (static scales are calibrated there). A method is a
whole method or alias with its ``conf/method`` file, or a recipe (``quarot+rtn``, ``awq+gptq``: Hydra's ConfigStore);
names that are neither are skipped with a message.

Targets on a 2-core machine: AWQ <= 90 s, HQQ <= 30 s, QuaRot+RTN <= 30 s, OmniQuant (CPU default) <= 15 min,
PB-LLM <= 120 s, peak host memory <= 3 GiB; a recipe costs no more than its stages run alone: AWQ+GPTQ <= AWQ +
GPTQ (the calibration inputs, the layer loop and the FP model are shared; reported after the table). The
compensation family at W3 g64 (``--quant w3g64``), relative to GPTQ's time in the same run: GPTAQ, residual-aware
compensation and FOEM <= 1.5 x GPTQ, GWQ <= 2 x GPTQ; DiscQuant <= 15 min. Rotation / FP4: MR-GPTQ <= 1.5 x GPTQ
on the same FP4 grid (``--quant mxfp4``), RPTQ <= 2 min, DartQuant <= 5 min at W4A4.

On a shared machine wall times grow with the load. Next to each time the script reports ``fwd512_s``, one 512-token
forward of the full-precision model timed right before and after the method (mean), and ``norm_s`` = quant_s ×
1.25 / fwd512_s: the time rescaled to the quiet machine's 1.25 s per 512-token forward (docs: anchors.md). The
rescaling is a diagnostic, not a measurement; the targets are checked against both.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT = ["awq", "hqq", "smoothquant", "quarot+rtn", "omniquant", "pbllm", "gptq", "rtn", "awq+gptq"]
# each method's natural scheme, as Hydra overrides
NATURAL: dict[str, list[str]] = {
    "awq": ["quant=w4g64"],
    "awq+gptq": ["quant=w4g64"],  # the recipe: AWQ scaling, then GPTQ (compared with awq + gptq alone)
    "hqq": ["quant=w4g64"],
    "gptq": ["quant=w4g64"],
    "rtn": ["quant=w4g64"],
    "smoothquant": ["quant=w8a8"],
    "quarot+rtn": ["quant=w4a4"],  # QuaRot-RTN (the recipe quarot+minmax+nearest)
    "quarot": ["quant=w4a4"],  # the alias: QuaRot with GPTQ rounding
    "omniquant": ["quant=w3g64"],
    "pbllm": ["quant=w2g64", "quant.group_size=-1", "quant.name=w2c"],  # its default: 2-bit class, per-row α
    "mrgptq": ["quant=mxfp4"],  # FP4 only: compare with --methods gptq mrgptq --quant mxfp4 (GPTQ on the same grid)
    "rptq": ["quant=w4a4"],
    "dartquant": ["quant=w4a4"],
}
TARGETS = {"awq": 90.0, "hqq": 30.0, "quarot+rtn": 30.0, "omniquant": 900.0, "pbllm": 120.0,  # seconds (the methods issue)
           "discquant": 900.0, "rptq": 120.0, "dartquant": 300.0}  # (the rotation / FP4 issue: RPTQ, DartQuant)
RELATIVE_TO_GPTQ = {"gptaq": 1.5, "rescomp": 1.5, "foem": 1.5, "gwq": 2.0,  # x GPTQ's time (the compensation issue)
                    "mrgptq": 1.5}  # (the FP4 issue; run with --quant mxfp4 so GPTQ works on the same grid)
TARGET_MEM_GIB = 3.0
QUIET_FWD512_S = 1.25  # one 512-token forward of SmolLM2-135M on the quiet 2-core machine (anchors.md)


def _fwd512(model, seq_len: int = 512) -> float:
    import torch

    ids = torch.arange(seq_len)[None, :] % 1000 + 100
    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


def bench(methods: list[str], n_samples: int, seq_len: int, quant: str | None = None) -> list[dict]:
    import torch
    from hydra import compose, initialize_config_dir

    import ptqbench
    from ptqbench import data, memory, models
    from ptqbench.actquant import attach_activation_quant
    from ptqbench.pipeline import target_linears
    from ptqbench.errors import ConfigError
    from ptqbench.quantizer import get_method
    from ptqbench.hydra_recipes import register_hydra_recipes
    from ptqbench.recipe import recipe_names
    from ptqbench.run import resolve

    register_hydra_recipes()  # method=quarot+rtn and the other recipes compose, as python -m ptqbench does
    rows: list[dict] = []
    loaded_cache: dict[str, models.LoadedModel] = {}
    calib_cache: dict = {}
    with initialize_config_dir(config_dir=str(ptqbench.conf_dir()), version_base="1.3"):
        for name in methods:
            try:
                get_method(name)
            except ConfigError as e:
                print(f"skip {name}: {e}", flush=True)
                continue
            if name not in recipe_names() and not (ptqbench.conf_dir() / "method" / f"{name}.yaml").is_file():
                print(f"skip {name}: no conf/method/{name}.yaml", flush=True)
                continue
            natural = [f"quant={quant}"] if quant else NATURAL.get(name, [])
            overrides = [f"method={name}", *natural, "calib=docs", f"calib.n_samples={n_samples}",
                         f"calib.seq_len={seq_len}"]
            cell = resolve(compose(config_name="config", overrides=overrides))
            key = repr(cell.model.identity())
            if key not in loaded_cache:
                loaded_cache[key] = models.load(cell.model)
            loaded = loaded_cache[key]
            calib = None
            if cell.calib is not None:
                ck = (cell.calib, cell.seed)
                if ck not in calib_cache:
                    calib_cache[ck] = data.draw_calibration(cell.calib, cell.seed, loaded.tokenizer,
                                                            loaded.tokenizer_id)
                calib = calib_cache[ck]
            row = {"method": name, "family": cell.method_cls.family, "quant": cell.scheme.label,
                   "calib": f"{cell.calib.n_samples}x{cell.calib.seq_len}" if cell.calib else "none"}
            fwd_before = _fwd512(loaded.model)
            model = copy.deepcopy(loaded.model)
            memory.reset_peaks()
            print(f"{name} at {cell.scheme.label} ...", flush=True)
            try:
                t0 = time.perf_counter()
                res = cell.method_cls(cell.scheme, cell.method_cfg).quantize(model, calib)
                if cell.scheme.a_bits < 16:  # as run() does, inside the timed part
                    names, _ = target_linears(model, cell.scheme)
                    attach_activation_quant(model, [n for n in names if n in res.layers], cell.scheme,
                                            calib.input_ids if calib is not None else None)
                row["quant_s"] = time.perf_counter() - t0
                row["peak_host_gib"] = memory.peak_host_gib()
                row["effective_bits"] = res.effective_bits()
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (one failing method does not end the benchmark)
                traceback.print_exc()
                row.update(quant_s=float("nan"), peak_host_gib=memory.peak_host_gib(), effective_bits=float("nan"),
                           status=f"failed: {type(e).__name__}: {e}"[:80])
            row["threads"] = torch.get_num_threads()
            del model
            row["fwd512_s"] = (fwd_before + _fwd512(loaded.model)) / 2
            row["norm_s"] = row["quant_s"] * QUIET_FWD512_S / row["fwd512_s"]
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    t = TARGETS.get(r["method"])
    ok = "" if t is None else ("ok" if r["quant_s"] <= t else "OVER" if r["norm_s"] > t else "over raw, ok norm")
    mem_ok = "ok" if r["peak_host_gib"] <= TARGET_MEM_GIB else "OVER"
    return (f"{r['method']:<12} {r['family']:<17} {r['quant']:<7} {r['calib']:<7} {r['quant_s']:>8.1f} "
            f"{r['fwd512_s']:>8.2f} {r['norm_s']:>7.1f} {'' if t is None else f'<= {t:.0f} s':<8} {ok:<18} "
            f"{r['peak_host_gib']:>8.2f} {mem_ok:<4} {r['effective_bits']:>6.2f}  {r['status']}")


HEADER = (f"{'method':<12} {'family':<17} {'quant':<7} {'calib':<7} {'quant_s':>8} {'fwd512_s':>8} {'norm_s':>7} "
          f"{'target':<8} {'time':<18} {'peak_GiB':>8} {'mem':<4} {'bits':>6}  status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT, help="methods to time (default: %(default)s)")
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default: %(default)s)")
    ap.add_argument("--quant", default=None, help="one scheme for every method (e.g. w3g64) instead of each one's own")
    args = ap.parse_args()
    rows = bench(args.methods, args.n_samples, args.seq_len, args.quant)
    print()
    print(HEADER)
    for r in rows:
        print(_line(r))
    t = {r["method"]: r["norm_s"] for r in rows if r["status"] == "ok"}
    if {"awq", "gptq", "awq+gptq"} <= set(t):
        alone = t["awq"] + t["gptq"]
        print(f"\nrecipe cost (norm_s): awq+gptq {t['awq+gptq']:.1f} s vs awq {t['awq']:.1f} + gptq {t['gptq']:.1f} = "
              f"{alone:.1f} s: {'ok' if t['awq+gptq'] <= alone else 'OVER'} (ratio {t['awq+gptq'] / alone:.2f})")
    if "gptq" in t:
        for m, k in RELATIVE_TO_GPTQ.items():
            if m in t:
                r = t[m] / t["gptq"]
                print(f"{m} / gptq (norm_s): {t[m]:.1f} / {t['gptq']:.1f} s = {r:.2f} x (target <= {k} x): "
                      f"{'ok' if r <= k else 'OVER'}")
    try:
        load = os.getloadavg()[0]
        print(f"\nthreads={rows[0]['threads'] if rows else '?'}  load average (1 min) at the end: {load:.1f} "
              f"on {os.cpu_count()} cores (times on a shared machine grow with the load)")
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    main()
