"""Perplexity with the GPTQ protocol: join the split's documents, tokenize once, cut non-overlapping windows of
``seq_len`` tokens, average the token-level negative log-likelihood over every predicted token, exponentiate.

The sum is accumulated in float64 per window, so the value does not depend on the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ptqbench.data import EvalSet


@torch.no_grad()
def perplexity(model: nn.Module, data: EvalSet, batch_size: int = 1, device: str | None = None) -> dict:
    """``{"value", "nll_sum", "n_tokens", "windows"}`` for ``model`` on ``data``'s windows."""
    device = device or str(next(model.parameters()).device)
    nll_sum, n_tokens = 0.0, 0
    for chunk in tqdm(data.windows.split(batch_size), desc=f"ppl {data.name}", leave=False):
        ids = chunk.to(device)  # (b, seq)
        logits = model(input_ids=ids, use_cache=False).logits  # (b, seq, vocab)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, seq-1)
        for row in nll.double():  # per window, so batching never changes the sum's order
            nll_sum += float(row.sum())
        n_tokens += nll.numel()
    mean = nll_sum / max(n_tokens, 1)
    value = math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
    return {"value": value, "nll_sum": nll_sum, "n_tokens": n_tokens, "windows": len(data.windows)}


from ptqbench import mirror  # noqa: E402
from ptqbench.data import check_source, eval_set  # noqa: E402
from ptqbench.errors import ConfigError  # noqa: E402
from ptqbench.evaluators import CellContext, register_evaluator  # noqa: E402
from ptqbench.validate import positive_int  # noqa: E402


def check_config(cfg: dict) -> None:
    """Refuse unknown eval datasets and impossible window counts or lengths before any work."""
    for name in cfg.get("datasets", []):
        check_source(name)
    if cfg.get("datasets"):
        positive_int("eval.perplexity.seq_len", cfg.get("seq_len"), minimum=2)
    positive_int("eval.perplexity.batch_size", cfg.get("batch_size", 1))
    # max_windows: null or <= 0 means every window (documented in conf/eval); only its type can be wrong
    mw = cfg.get("max_windows")
    if mw is not None and (isinstance(mw, bool) or not isinstance(mw, int)):
        raise ConfigError(f"eval.perplexity.max_windows={mw!r}: use an integer (<= 0 or null: every window)")


@register_evaluator("perplexity")
def perplexity_rows(cell: CellContext, cfg: dict) -> list[dict]:
    rows = []
    for name in cfg.get("datasets", []):
        key = ("evalset", name, cfg["seq_len"], cfg.get("max_windows"), cell.tokenizer_id, mirror.current())
        if key not in cell.cache:
            cell.cache[key] = eval_set(name, cfg["seq_len"], cfg.get("max_windows"), cell.tokenizer, cell.tokenizer_id)
        data = cell.cache[key]
        r = perplexity(cell.model, data, batch_size=cfg.get("batch_size", 1), device=cell.device)
        finite = math.isfinite(r["value"])
        rows.append({"metric": "perplexity", "dataset": name, "group": "", "value": r["value"], "unit": "ppl",
                     "protocol": data.protocol, "status": "ok" if finite else "diverged",
                     "error": "" if finite else "non-finite perplexity"})
    return rows
