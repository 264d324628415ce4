"""The real packed path: swap the fake-quantized linears for ``QuantLinear`` (packed codes; Triton on a GPU,
torch dequantization on a CPU) and check that perplexity matches the fake-quantized model.

Row ``packed_vs_fake_ppl_rel`` = |ppl(packed) - ppl(fake)| / ppl(fake) on the same windows (expected < 1e-3), and
``packed_weight_bytes``, the packed size of the quantized linears.
"""

from __future__ import annotations

import copy

from ptqbench.data import eval_set
from ptqbench.evaluators import CellContext, register_evaluator
from ptqbench.evaluators.perplexity import perplexity


@register_evaluator("packed")
def packed_rows(cell: CellContext, cfg: dict) -> list[dict]:
    if cell.is_baseline or not cell.result.layers:
        return []
    from ptqbench.kernels.packing import PackedWeight
    from ptqbench.kernels.quant_linear import swap_to_quant_linear

    name, seq_len, windows = cfg.get("dataset", "docs"), int(cfg.get("seq_len", 512)), int(cfg.get("max_windows", 2))
    protocol = f"ppl:{name};seq_len={seq_len};windows={windows};packed QuantLinear vs fake-quantized weights"
    try:
        for qw in cell.result.layers.values():  # refuse what cannot be packed before copying the model
            if not hasattr(qw, "packed_module"):  # (formats that build their own packed module: GWQ)
                PackedWeight.from_quantized(qw)
        packed_model = swap_to_quant_linear(copy.deepcopy(cell.model), cell.result.layers)
        nbytes = sum(packed_model.get_submodule(n).nbytes for n in cell.result.layers)
    except (ValueError, NotImplementedError) as e:  # a format the packed kernels do not cover (e.g. PB-LLM)
        return [{"metric": "packed_vs_fake_ppl_rel", "value": float("nan"), "unit": "rel", "status": "skipped",
                 "error": f"not packable: {e}", "protocol": protocol}]
    data = eval_set(name, seq_len, windows, cell.tokenizer, cell.tokenizer_id)
    fake = perplexity(cell.model, data, device=cell.device)["value"]
    packed = perplexity(packed_model, data, device=cell.device)["value"]
    del packed_model
    return [
        {"metric": "packed_vs_fake_ppl_rel", "value": abs(packed - fake) / fake, "unit": "rel", "dataset": name,
         "protocol": protocol},
        {"metric": "packed_weight_bytes", "value": float(nbytes), "unit": "bytes",
         "protocol": "PackedWeight.nbytes summed over the quantized linears"},
    ]
