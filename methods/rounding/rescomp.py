"""``rescomp`` rounding: residual-aware compensation — Rethinking Residual Errors in Compensation-based LLM
Quantization.

Li, Deng, Xu, Deng, Gu, Jiang, Shen, Huang, 2026, https://arxiv.org/abs/2604.07955 (reference code: ResComp).
``method=rescomp`` = ``none+minmax+rescomp``.

GPTAQ (``gptaq``) aligns each quantized layer with the full-precision model's output, but inside a layer each
step still aligns the quantized output with the output of the *compensated* weights (the weights GPTQ's feedback
has already moved), not with the original ones. This paper redefines the per-step objective as the original
weights' full-precision output, ``‖W_orig X_fp − Q X_q‖``, and finds a second residual beside GPTAQ's
``ΔX = X_fp − X_q``: the *compensation-aware error* ``W_orig − W`` between the original and the compensated
weights of the layer. With GPTAQ's neuron decomposition it enters the update as one more (in, in) matrix shared by
all rows: quantizing column ``i`` also adds ``(w_orig,i − w_i)·R[i, i:]`` to the later columns,
``R = α₂·triu((D + H)·Uᵀ, 1)·U`` (``D + H = 2/N·X_fpᵀX_q``), on top of GPTAQ's ``w_i·P[i, i:]``.

Defaults (reference code): GPTAQ's ``α = 0.25`` and ``α₂ = 0.25``; ``mode=auto``: at 3 bits and more the lazy
update after each block multiplies ``P`` and ``R`` by the latent (pre-rounding) columns clamped to their grid's
range, as the derivation says (``allw``); at 2 bits by what the block left in its columns, GPTAQ's code path
(``org``), which the authors found stable where ``allw`` can diverge. Both selectable.

Computation: ``H·Uᵀ`` is ``U⁻¹`` up to a diagonal-times-lower part that ``triu(·, 1)`` drops, so
``R = α₂·(B + I − diag(U)⁻¹·U)`` with ``B = triu(D·Uᵀ, 1)·U``: the core (``gptq_quantize``) folds R's terms into
GPTAQ's row (``α·w + α₂·r`` times ``B``) and GPTQ's (``err + α₂·r / U[i, i]`` times ``U``), one (in, in) product pair
and one rank-1 update per column fewer than R written out — equal in exact arithmetic, tested against the literal
matrix; on the full model float rounding differs from the literal form (about 1e-4 of codes per linear flip).

Deviation (documented): the reference code clamps the whole block's latent columns to the range of the block's
last group; here each column is clamped to its own group's range. Everything else as ``gptaq`` (same statistics,
same memory: one more copy of the calibration hidden states and one layer's weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.errors import ConfigError
from ptqbench.methods.rounding.gptaq import GPTAQ, GPTAQConfig
from ptqbench.methods.rounding.gptq import Compensation
from ptqbench.stages import register_stage

MODES = ("auto", "allw", "org")


@dataclass
class ResCompConfig(GPTAQConfig):
    alpha2: float = 0.25  # weight of the compensation-aware term R (reference code: 0.25)
    mode: str = "auto"  # auto: allw at >= 3 bits, org at 2 bits (reference code)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha2 <= 1:
            raise ConfigError(f"rescomp.alpha2={self.alpha2}: use a value in [0, 1] (paper: 0.25; 0 is GPTAQ)")
        if self.mode not in MODES:
            raise ConfigError(f"rescomp.mode={self.mode!r}: use one of {list(MODES)} (paper: auto)")
        super().__post_init__()


@register_stage
class ResComp(GPTAQ):
    """Residual-aware compensation (Li et al., 2026): GPTAQ plus the compensation-aware error term."""

    name = "rescomp"
    config_cls = ResCompConfig
    paper = "https://arxiv.org/abs/2604.07955"
    config: ResCompConfig

    def compensation(self, name: str, w: torch.Tensor, extra: torch.Tensor | None) -> Compensation | None:
        c = self.config
        latent = c.mode == "allw" or (c.mode == "auto" and self.scheme.w_bits >= 3)
        return Compensation(asym=extra, alpha=c.alpha, w_orig=w, rescomp=c.alpha2, latent_outer=latent)
