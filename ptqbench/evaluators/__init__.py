"""Evaluators: each turns a quantized cell into result rows; none knows which method ran.

An evaluator is a function ``fn(cell: CellContext, cfg: dict) -> list[dict]`` registered under the name of its
section in the ``eval=`` config (``perplexity``, ``tasks``, ``memory``, ``latency``...). Each row dict holds at least
``metric``, ``value`` and, as needed, ``dataset``, ``group``, ``unit``, ``protocol``, ``status``, ``error``;
the run loop adds the cell's identity columns.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

Evaluator = Callable[["CellContext", dict], list[dict]]
_EVALUATORS: dict[str, Evaluator] = {}


@dataclass
class CellContext:
    """What an evaluator may read about the cell being measured."""

    model: nn.Module  # the quantized (fake-quantized) model, in eval mode
    tokenizer: Any
    tokenizer_id: str
    model_name: str
    device: str
    result: Any  # ptqbench.quantizer.QuantResult
    scheme: Any  # ptqbench.scheme.QuantScheme
    is_baseline: bool  # the unquantized reference cell
    seed: int
    calibration: Any = None  # ptqbench.data.Calibration or None
    cache: dict[str, Any] = field(default_factory=dict)  # process-wide, shared by every cell of a sweep
    # the fp16 baseline cell's rows when the results store already holds it complete (written by another process
    # or an earlier run), else None: drop rows read it instead of recomputing the baseline in every worker
    stored_baseline: Callable[[], list[dict] | None] | None = None


def register_evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    def deco(fn: Evaluator) -> Evaluator:
        if name in _EVALUATORS and _EVALUATORS[name] is not fn:
            raise ValueError(f"an evaluator named {name!r} is already registered")
        _EVALUATORS[name] = fn
        return fn

    return deco


def evaluators() -> dict[str, Evaluator]:
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")
    return dict(_EVALUATORS)
