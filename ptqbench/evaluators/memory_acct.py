"""Memory accounting of a quantized cell (the ``memory`` eval section): what the weights take once packed.

Rows (``dataset`` empty; ``group`` names the part where one is meant):

* ``quant_linear_params`` / ``quant_linear_bytes`` / ``quant_linear_fp16_bytes`` / ``quant_linear_size_ratio`` /
  ``packed_bits_per_weight``: the quantized linears packed (``ptqbench.kernels.packing.PackedWeight.nbytes``: codes in
  int32 words padded to 32 columns, fp16 scales, packed zeros, act-order permutation, extras), the same linears at
  fp16, and their ratio. Where packing is unavailable the bytes are ``QuantizedWeight.storage_bits() / 8`` (the
  protocol says which). ``effective_bits`` (unpadded storage bits per weight) is already written by the run loop.
* ``kept_fp_params`` / ``kept_fp_bytes`` per group ``embeddings``, ``norms``, ``lm_head`` (0 when tied to the
  embeddings, which are then counted once), ``linears`` (linears kept in floating point by the scheme), ``other``
  (biases, other parameters), and ``total``; counted at fp16 (2 bytes), the deployment dtype.
* ``model_bytes`` (quantized linears packed + kept parameters at fp16), ``model_fp16_bytes`` and
  ``model_size_ratio``.

Peak host/GPU memory during quantization and evaluation are measured by the run loop, not here.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn

from ptqbench.evaluators import CellContext, register_evaluator
from ptqbench.scheme import QuantizedWeight

log = logging.getLogger(__name__)

FP16_BYTES = 2
KEPT_GROUPS = ("embeddings", "norms", "lm_head", "linears", "other")


def quantized_bytes(qw: QuantizedWeight, packed: bool = True) -> tuple[int, str]:
    """Bytes of one quantized linear and how they were counted (``packed`` or ``storage_bits``)."""
    if packed and hasattr(qw, "packed_nbytes"):  # a format with its own packed layout (FP4)
        return int(qw.packed_nbytes()), "packed"
    if packed:
        try:
            from ptqbench.kernels.packing import PackedWeight

            return int(PackedWeight.from_quantized(qw).nbytes), "packed"
        except (ImportError, ValueError) as e:  # no packing module, or a format it cannot pack
            log.debug("memory: packing unavailable (%s); counting storage bits", e)
    return math.ceil(qw.storage_bits() / 8), "storage_bits"


def classify_parameters(model: nn.Module, quantized: set[str]) -> dict[str, dict[str, int]]:
    """Parameter counts ``{group: {"params": n}}`` of everything outside the quantized linears' weights.

    Shared tensors (tied embeddings/lm_head) are counted once, under the first module that owns them.
    """
    out = {g: {"params": 0} for g in KEPT_GROUPS}
    seen: set[int] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, nn.Linear) and p_name == "weight" and mod_name in quantized:
                continue
            if isinstance(mod, nn.Embedding):
                group = "embeddings"
            elif mod is out_emb:
                group = "lm_head"
            elif "norm" in type(mod).__name__.lower():
                group = "norms"
            elif isinstance(mod, nn.Linear) and p_name == "weight":
                group = "linears"
            else:
                group = "other"
            out[group]["params"] += p.numel()
    return out


def memory_rows(model: nn.Module, layers: dict[str, QuantizedWeight], packed: bool = True) -> list[dict[str, Any]]:
    """The memory rows of a model whose linears ``layers`` were quantized (empty for the baseline)."""
    n_q, q_bytes, how = 0, 0, set()
    for qw in layers.values():
        b, h = quantized_bytes(qw, packed)
        n_q += qw.qweight.numel()
        q_bytes += b
        how.add(h)
    counting = "+".join(sorted(how)) or "none"
    kept = classify_parameters(model, set(layers))
    kept_total = sum(v["params"] for v in kept.values())
    proto_q = (f"quantized linears: {counting} bytes (codes, fp16 scales, zeros, perm/g_idx, extras) over "
               f"{len(layers)} linears")
    rows = [
        {"metric": "quant_linear_params", "value": float(n_q), "unit": "params", "protocol": proto_q},
        {"metric": "quant_linear_bytes", "value": float(q_bytes), "unit": "bytes", "protocol": proto_q},
        {"metric": "quant_linear_fp16_bytes", "value": float(n_q * FP16_BYTES), "unit": "bytes",
         "protocol": "the same linears at fp16"},
        {"metric": "quant_linear_size_ratio", "value": q_bytes / (n_q * FP16_BYTES) if n_q else 1.0,
         "unit": "x fp16", "protocol": proto_q + " / fp16 bytes"},
        {"metric": "packed_bits_per_weight", "value": 8 * q_bytes / n_q if n_q else 16.0, "unit": "bits/weight",
         "protocol": proto_q},
    ]
    proto_k = "parameters outside the quantized linears, tied tensors once, counted at fp16 (2 bytes)"
    for g in (*KEPT_GROUPS, "total"):
        n = kept_total if g == "total" else kept[g]["params"]
        rows += [{"metric": "kept_fp_params", "group": g, "value": float(n), "unit": "params", "protocol": proto_k},
                 {"metric": "kept_fp_bytes", "group": g, "value": float(n * FP16_BYTES), "unit": "bytes",
                  "protocol": proto_k}]
    total = q_bytes + kept_total * FP16_BYTES
    fp16_total = (n_q + kept_total) * FP16_BYTES
    rows += [
        {"metric": "model_bytes", "value": float(total), "unit": "bytes",
         "protocol": "quantized linears packed + kept parameters at fp16"},
        {"metric": "model_fp16_bytes", "value": float(fp16_total), "unit": "bytes",
         "protocol": "every parameter at fp16, tied tensors once"},
        {"metric": "model_size_ratio", "value": total / fp16_total if fp16_total else 1.0, "unit": "x fp16",
         "protocol": "model_bytes / model_fp16_bytes"},
    ]
    for r in rows:
        r.setdefault("group", "")
        r.setdefault("dataset", "")
    return rows


@register_evaluator("memory")
def memory_section(cell: CellContext, cfg: dict) -> list[dict]:
    layers = {} if cell.is_baseline or cell.result is None else dict(cell.result.layers)
    return memory_rows(cell.model, layers, packed=bool(cfg.get("packed", True)))
