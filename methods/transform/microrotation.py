"""``mr`` transform: block-wise Hadamard "micro-rotations" of every quantized linear's input (MR-GPTQ's transform).

Egiazarian, Castro, Kuznedelev, Panferov, Kurtić, Pandit, Marques, Kurtz, Ashkboos, Hoefler, Alistarh, "Bridging the
Gap Between Promise and Performance for Microscaling FP4 Quantization", 2025, https://arxiv.org/abs/2509.23202.

Each quantized linear ``y = x·Wᵀ`` becomes ``y = (x·H)·(W·H)ᵀ`` with ``H`` block-diagonal: one normalised Hadamard
matrix of order ``block`` per consecutive ``block`` input features. ``W·H`` is fused into the weight offline; ``x·H``
runs online (a forward pre-hook, before any activation quantizer, since hooks run in registration order). Since
``H·Hᵀ = I`` the floating-point outputs do not change. With ``block`` equal to the FP4 format's scale block (32 for
MXFP4, 16 for NVFP4, the default ``block=0``) each rotation mixes exactly the elements that share one scale, which
spreads a block's outlier over its block without moving energy between blocks (the paper's argument for why a
global rotation fits microscaling formats poorly and a block-wise one fits them well).

The alias ``mrgptq`` is ``mr+minmax+mrgptq``: these rotations, then GPTQ on the FP4 grid with MSE-searched scales
(``methods/rounding/mrgptq.py``). ``mr+rtn`` is the paper's rotation with round-to-nearest.

Deviations (documented): plain Sylvester Hadamard blocks (no random signs); the online rotation is a dense
``(block, block)`` matrix product per block rather than a fast Walsh-Hadamard kernel (same result; the paper fuses it
into its GPU kernels). Every quantized linear gets its own hook, so q/k/v (and gate/up) each rotate their shared
input once (3× and 2× the online work of one fused rotation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.models import linear_layers
from ptqbench.pipeline import target_linears
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import FORMATS, FP4_GROUP, QuantScheme
from ptqbench.stages import Transform, register_stage


def sylvester_hadamard(n: int) -> torch.Tensor:
    """Normalised Hadamard matrix (n, n) float64 of a power-of-two order (Sylvester's construction)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def block_rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``x·diag(H, H, ...)`` for ``x`` (..., n) and one Hadamard block ``h`` (b, b); n a multiple of b."""
    b = h.shape[0]
    return (x.reshape(*x.shape[:-1], -1, b) @ h.to(x.dtype)).reshape(x.shape)


class BlockRotation:
    """Forward pre-hook: the linear's input times the block-diagonal Hadamard matrix."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h

    def __call__(self, _mod: nn.Module, args: tuple) -> tuple:
        return (block_rotate(args[0], self.h), *args[1:])


@dataclass
class MicroRotationConfig(MethodConfig):
    block: int = 0  # rotation block (a power of two); 0: the FP4 format's scale block (MXFP4 32, NVFP4 16)

    def __post_init__(self) -> None:
        if self.block < 0 or (self.block and self.block & (self.block - 1)):
            raise ConfigError(f"mr.block={self.block}: use 0 (the format's block) or a power of two such as 16 or 32")
        super().__post_init__()


def rotation_block(scheme: QuantScheme, block: int) -> int:
    """The rotation block for ``scheme``: ``block``, or the format's scale block (the group size for integers)."""
    if block:
        return block
    if scheme.w_format in FP4_GROUP:
        return FP4_GROUP[scheme.w_format]
    return scheme.group_size


@register_stage
class MicroRotation(Transform):
    """Block-wise Hadamard rotations of each quantized linear's input, fused into its weight (MR-GPTQ)."""

    name = "mr"
    synonyms = ("microrotation",)
    family = "rotation"
    config_cls = MicroRotationConfig
    level = "model"
    supported_formats = FORMATS
    paper = "https://arxiv.org/abs/2509.23202"
    config: MicroRotationConfig

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        if scheme.w_format == "int" and (scheme.group_size < 1 or scheme.group_size & (scheme.group_size - 1)):
            raise ConfigError(f"mr: an integer scheme rotates blocks of its group size, which must be a power of two "
                              f"(quant.group_size={scheme.group_size}): use e.g. quant=w4g64, or an FP4 quant")

    @torch.no_grad()
    def apply_model(self, model: nn.Module, calibration: Any) -> None:
        b = rotation_block(self.scheme, self.config.block)
        h = sylvester_hadamard(b)
        names, _ = target_linears(model, self.scheme)
        mods = linear_layers(model)
        for n in names:
            lin = mods[n]
            if lin.in_features % b:
                raise ConfigError(f"mr: {n} has {lin.in_features} inputs, not a multiple of the rotation block {b}: "
                                  f"set method.params.transform.block to a divisor")
            w = lin.weight.data
            lin.weight.data = block_rotate(w.double(), h).to(w.dtype)  # W·H, fused offline
            lin.register_forward_pre_hook(BlockRotation(h.to(w.device, torch.float32)))
        self._info = {"rotation_block": float(b), "rotated_linears": float(len(names))}
