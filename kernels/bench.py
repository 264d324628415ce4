"""Kernel latency against the torch fp16 matmul and the HBM roofline.

    python -m ptqbench.kernels.bench [--bits 2 3 4 8] [--batch 1 16 64] [--shapes model|standard|all]
                                     [--model-shapes N,K ...] [--group-size 128] [--out file.csv]

Shapes are ``N x K`` = out_features x in_features of a linear (``y = x @ W.T``, W is (N, K)). Each (shape, bits,
batch) gives five rows in the results-store format (``ptqbench.results.COLUMNS``): ``latency_us`` (packed kernel),
``latency_fp16_us`` (``F.linear`` with an fp16 weight), ``speedup_vs_fp16``, ``achieved_gbps`` (bytes moved by the
kernel / latency: packed weight + x + y) and ``roofline_frac`` (achieved / peak HBM bandwidth of the GPU, from a
table of known parts or, for other GPUs, a measured device-to-device copy). Latencies are medians of
``triton.testing.do_bench`` (L2 flushed before every repetition; warmup and rep recorded in ``protocol``), taken
after a first call that compiles and autotunes. Without a GPU every row has ``status="skipped"`` and a NaN value.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys

import torch

from ptqbench.kernels.packing import PackedWeight
from ptqbench.scheme import QuantizedWeight, QuantScheme, group_index

STANDARD_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (N out, K in): Llama-7B attention and MLP
METRICS = {  # metric -> unit
    "latency_us": "us", "latency_fp16_us": "us", "speedup_vs_fp16": "x", "achieved_gbps": "GB/s",
    "roofline_frac": "frac",
}
# peak HBM bandwidth (GB/s) by device-name substring, most specific first
PEAK_GBPS = [
    ("h200", "H200", 4800.0), ("h100 nvl", "H100 NVL", 3900.0), ("h100 pcie", "H100 PCIe", 2000.0),
    ("h100", "H100 SXM", 3350.0), ("a100 80gb", "A100 80GB", 2000.0), ("a100-sxm4-80gb", "A100 80GB", 2000.0),
    ("a100", "A100 40GB", 1555.0), ("l40s", "L40S", 864.0), ("rtx 4090", "RTX 4090", 1008.0),
]


def _driver_version() -> str:
    try:
        import pynvml  # optional

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 (pynvml missing or failing: ask nvidia-smi)
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def measured_copy_gbps(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes / median time)."""
    import triton.testing

    src = torch.empty(n_bytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def gpu_info() -> dict:
    """name, driver, device (the row's ``device`` string), peak_gbps and where that peak comes from."""
    name = torch.cuda.get_device_name()
    lower = name.lower()
    peak = next(((gbps, f"table: {label}") for key, label, gbps in PEAK_GBPS if key in lower), None)
    if peak is None:
        peak = (measured_copy_gbps(), "measured device-to-device copy")
    driver = _driver_version()
    return {"name": name, "driver": driver, "device": f"{name}, driver {driver}, CUDA {torch.version.cuda}",
            "peak_gbps": peak[0], "peak_source": peak[1]}


def random_packed(n: int, k: int, bits: int, group_size: int, sym: bool = False, device: str = "cuda",
                  seed: int = 0) -> PackedWeight:
    """A packed (N, K) weight with random codes, scales and zeros (latency does not depend on the values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_groups = 1 if group_size == -1 else math.ceil(k / group_size)
    q = torch.randint(0, 2**bits, (n, k), generator=g, device=device, dtype=torch.uint8)
    scales = (torch.rand(n, n_groups, generator=g, device=device) * 0.01 + 1e-3).half()
    zeros = (torch.full((n, n_groups), 2 ** (bits - 1), device=device, dtype=torch.uint8) if sym else
             torch.randint(0, 2**bits, (n, n_groups), generator=g, device=device, dtype=torch.uint8))
    qw = QuantizedWeight(q, scales, zeros, bits, group_size, group_index(k, group_size, device).int(), sym)
    return PackedWeight.from_quantized(qw)


def _dedupe(shapes) -> list[tuple[int, int]]:
    seen: dict[tuple[int, int], None] = {}
    for s in shapes:
        seen[(int(s[0]), int(s[1]))] = None
    return list(seen)


def latency_rows(shapes: list[tuple[int, int]], bits_list, batches, group_size: int = 128,
                 dtype: torch.dtype = torch.float16, *, sym: bool = False, warmup: int = 25, rep: int = 100
                 ) -> list[dict]:
    """Rows (results-store dicts) for every (N, K) in ``shapes`` (measured as given, duplicates dropped; add
    ``STANDARD_SHAPES`` yourself if wanted) x bits x batch. Never invents a number: without a GPU or triton the
    rows are ``status="skipped"`` with NaN values, a failed measurement gives ``status="failed"`` rows."""
    shapes = _dedupe(shapes)
    dname = "bf16" if dtype == torch.bfloat16 else "fp16"
    protocol = (f"triton.testing.do_bench warmup={warmup}ms rep={rep}ms return_mode=median, L2 flushed each rep, "
                f"after a compile/autotune call; x {dname}; shape N(out)xK(in); GEMV kernel for batch <= 8, "
                f"GEMM above; baseline F.linear with a {dname} weight; bytes = packed W + x + y")
    skip = None
    if not torch.cuda.is_available():
        skip = "no CUDA GPU here (torch.cuda.is_available() is False): kernel latency is only measured on a GPU"
    else:
        try:
            import triton.testing  # noqa: F401
            from ptqbench.kernels.triton_kernels import INTERPRET
            if INTERPRET:
                skip = "TRITON_INTERPRET=1 is set: interpreted kernels have no meaningful latency"
        except ImportError as e:
            skip = f"triton is not importable ({e}): pip install triton"
    info = gpu_info() if skip is None else {"device": "cuda" if torch.cuda.is_available() else "cpu"}
    if skip is None:
        protocol += f"; peak {info['peak_gbps']:.0f} GB/s ({info['peak_source']})"
    rows: list[dict] = []

    def emit(n, k, bits, m, values: dict | None, status: str, error: str | None) -> None:
        for metric, unit in METRICS.items():
            rows.append({
                "w_bits": bits, "a_bits": 16, "group_size": group_size, "sym": sym,
                "quant": QuantScheme(w_bits=bits, group_size=group_size, sym=sym).label,
                "metric": metric, "dataset": f"{n}x{k}", "group": f"b{m}",
                "value": float("nan") if values is None else float(values[metric]), "unit": unit,
                "status": status, "error": error, "protocol": protocol, "device": info["device"],
            })

    for n, k in shapes:
        fp16_us: dict[int, float] = {}
        for bits in bits_list:
            for m in batches:
                if skip is not None:
                    emit(n, k, bits, m, None, "skipped", skip)
                    continue
                try:
                    values = _measure(n, k, bits, m, group_size, sym, dtype, warmup, rep, info, fp16_us)
                except Exception as e:  # noqa: BLE001 (one failed shape must not lose the others)
                    emit(n, k, bits, m, None, "failed", f"{type(e).__name__}: {e}".splitlines()[0])
                    continue
                emit(n, k, bits, m, values, "ok", None)
    return rows


def _measure(n, k, bits, m, group_size, sym, dtype, warmup, rep, info, fp16_us: dict) -> dict:
    import triton.testing

    from ptqbench.kernels.triton_kernels import quant_matmul

    packed = random_packed(n, k, bits, group_size, sym)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    quant_matmul(x, packed)  # compile + autotune outside the timed region
    us = triton.testing.do_bench(lambda: quant_matmul(x, packed), warmup=warmup, rep=rep,
                                 return_mode="median") * 1e3
    if m not in fp16_us:  # the fp16 baseline does not depend on bits: measure it once per (shape, batch)
        w16 = torch.randn(n, k, device="cuda", dtype=dtype)
        fp16_us[m] = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w16), warmup=warmup, rep=rep,
                                             return_mode="median") * 1e3
        del w16
    moved = packed.nbytes + (m * k + m * n) * x.element_size()
    gbps = moved / (us * 1e-6) / 1e9
    return {"latency_us": us, "latency_fp16_us": fp16_us[m], "speedup_vs_fp16": fp16_us[m] / us,
            "achieved_gbps": gbps, "roofline_frac": gbps / info["peak_gbps"]}


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: write N,K (out,in), e.g. 4096,11008") from None
    return n, k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptqbench.kernels.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--shapes", choices=("model", "standard", "all"), default="all",
                    help="model: only --model-shapes; standard: 4096x4096, 4096x11008, 11008x4096; all: both")
    ap.add_argument("--model-shapes", type=_shape, nargs="*", default=[], metavar="N,K",
                    help="linear shapes out,in (e.g. from a model's named_modules)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    ap.add_argument("--out", help="write the rows to this csv file")
    args = ap.parse_args(argv)
    if args.shapes == "model" and not args.model_shapes:
        print("error: --shapes model needs --model-shapes N,K ...", file=sys.stderr)
        return 2
    shapes = (args.model_shapes if args.shapes != "standard" else []) + (
        STANDARD_SHAPES if args.shapes != "model" else [])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = latency_rows(shapes, args.bits, args.batch, args.group_size, dtype, sym=args.sym, warmup=args.warmup,
                        rep=args.rep)
    from ptqbench.results import to_frame

    df = to_frame(rows)
    if args.out:
        df.to_csv(args.out, index=False)
    wide = df.pivot_table(index=["dataset", "group", "w_bits"], columns="metric", values="value", dropna=False)
    print(f"device: {df['device'].iloc[0]}; status: {', '.join(sorted(set(df['status'])))}")
    if (df["status"] != "ok").any():
        print(f"note: {df.loc[df['status'] != 'ok', 'error'].iloc[0]}")
    print(wide.to_string(float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
