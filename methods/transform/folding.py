"""Folding per-channel scales into the operation that produces a linear's input (shared by the scaling transforms).

A scaling transform multiplies the input channels of a group of linears by ``s`` (``W·diag(s)``) and divides their
input by ``s`` exactly, by folding ``1/s`` into the norm that produces it or into the rows of the linear before.
These helpers find those producers and do the folding; ``methods/transform/awq.py`` and
``methods/transform/smoothquant.py`` decide the scales.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptqbench.errors import ConfigError


def input_producers(layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, str | None]:
    """For each linear of ``layer``: the name of the leaf module whose output it takes as input (a norm), if any.

    Traced on one forward: outputs are kept alive during the probe so tensor identities are not reused.
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    found: dict[str, str | None] = {}
    handles = []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(
                (lambda n: lambda _m, a: found.__setitem__(n, produced.get(id(a[0]), (None,))[0]))(name)))
        elif name and not list(mod.children()):
            handles.append(mod.register_forward_hook(
                (lambda n: lambda _m, _a, o: produced.__setitem__(id(o), (n, o)) if isinstance(o, torch.Tensor)
                 else None)(name)))
    try:
        with torch.no_grad():
            layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """Make ``norm`` output ``norm(x) / s``: ``w/s`` (and ``b/s``), or ``(1+w)/s - 1`` for Gemma-style norms.

    The parametrization is checked on a probe rather than guessed from the class name.
    """
    w = norm.weight
    s = s.to(w.device, torch.float32)
    probe = torch.randn(4, w.numel(), dtype=w.dtype, device=w.device)
    ref = norm(probe).float() / s
    orig = w.data.clone()
    bias = getattr(norm, "bias", None)
    w.data = (orig.float() / s).to(w.dtype)
    if bias is not None:
        bias.data = (bias.data.float() / s).to(bias.dtype)
    if torch.allclose(norm(probe).float(), ref, rtol=1e-4, atol=1e-5):
        return
    w.data = ((1 + orig.float()) / s - 1).to(w.dtype)  # Gemma: y = norm(x) · (1 + w)
    if bias is not None or not torch.allclose(norm(probe).float(), ref, rtol=1e-4, atol=1e-5):
        raise ConfigError(f"cannot fold scales into {type(norm).__name__}: awq/smoothquant support norms computing "
                          "x̂·w(+b) or x̂·(1+w)")


@torch.no_grad()
def fold_into_rows(prev: nn.Linear, s: torch.Tensor) -> None:
    """Divide the output rows of ``prev`` (and its bias) by ``s``, so its consumer sees ``x / s``."""
    prev.weight.div_(s.to(prev.weight)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias))


@torch.no_grad()
def scale_columns(linears: list[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])


def smoothing_groups(layer: nn.Module, groups: list[list[str]], producers: dict[str, str | None]
                     ) -> list[tuple[list[str], str | None, str]]:
    """``(group, previous op, kind)`` per shared-input group; kind: ``norm``, ``linear`` or ``none``.

    A group fed by a norm folds into it; ``o_proj`` folds into ``v_proj`` when their sizes match, ``down_proj`` into
    ``up_proj`` (their inputs are no module's output, so they are matched by the Llama names).
    """
    mods = dict(layer.named_modules())
    out = []
    for g in groups:
        prod = producers.get(g[0])
        if prod is not None and isinstance(getattr(mods[prod], "weight", None), nn.Parameter) \
                and mods[prod].weight.numel() == mods[g[0]].in_features:
            out.append((g, prod, "norm"))
            continue
        prev = None
        for consumer, source in (("o_proj", "v_proj"), ("down_proj", "up_proj")):
            if len(g) == 1 and g[0].endswith(consumer):
                cand = g[0][: -len(consumer)] + source
                if cand in mods and mods[cand].out_features == mods[g[0]].in_features:
                    prev = cand
        out.append((g, prev, "linear" if prev else "none"))
    return out


def take_batch(kwargs: dict[str, Any], batch: int, k: int) -> dict[str, Any]:
    """Keyword inputs for the first ``k`` samples of a chunk of ``batch`` (tensors with a batch dim are cut)."""
    return {key: (v[:k] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch and batch > 1
                  else v) for key, v in kwargs.items()}
