"""Kernel latency of the cell's quantized linear shapes (plus the standard 7B shapes) against the fp16 matmul and
the HBM roofline, through ``ptqbench.kernels.bench.latency_rows``. Without a GPU the rows say ``skipped``."""

from __future__ import annotations

from ptqbench.evaluators import CellContext, register_evaluator


@register_evaluator("latency")
def latency(cell: CellContext, cfg: dict) -> list[dict]:
    from ptqbench.kernels.bench import STANDARD_SHAPES, latency_rows

    if cell.is_baseline or not cell.result.layers:
        return []
    if cell.scheme.w_format != "int":  # the Triton kernels cover integer formats; FP4 runs on the torch path
        return [{"metric": "latency_us", "value": float("nan"), "unit": "us", "status": "skipped",
                 "error": f"unsupported format {cell.scheme.w_format}: the Triton kernels cover integer formats",
                 "protocol": "kernels.bench.latency_rows"}]
    shapes = sorted({qw.shape for qw in cell.result.layers.values()})  # kept-fp linears are not measured
    if cfg.get("standard_shapes", True):
        shapes += [s for s in STANDARD_SHAPES if s not in shapes]
    rows = latency_rows(shapes, [cell.scheme.w_bits], list(cfg.get("batches", [1, 16, 64])),
                        group_size=cell.scheme.group_size, sym=cell.scheme.sym,
                        warmup=int(cfg.get("warmup", 25)), rep=int(cfg.get("rep", 100)))
    # the rows belong to this cell: label them with its scheme, so that W4A8 and W4A4 cells of one method (same
    # weight format) stay apart in tables; the kernels keep activations in 16 bits, and the protocol says so
    s = cell.scheme
    note = f"; kernel W{s.w_bits}xA16: the scheme's A{s.a_bits} is not fused" if s.a_bits < 16 else ""
    for r in rows:
        r.update(quant=s.label, a_bits=s.a_bits, protocol=r["protocol"] + note)
    return rows
