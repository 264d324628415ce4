"""``gptaq`` rounding: GPTAQ — Efficient Finetuning-Free Quantization for Asymmetric Calibration.

Li, Yin, Lee, Xiao, Panda, ICML 2025, https://arxiv.org/abs/2504.02692 (first released as GPTQv2). Alone:
``method=gptaq`` = ``none+minmax+gptaq``; with a rotation: ``method=quarot+gptaq``.

GPTQ fits each quantized linear to its own output on the inputs the quantized model feeds it (symmetric
calibration): ``‖W X_q − Q X_q‖``. GPTAQ fits it to the *full-precision model's* output instead (asymmetric
calibration), ``‖W X_fp − Q X_q‖``, so each layer also corrects the error the layers before it left in its inputs.
Optimal brain compression on that objective gives GPTQ's column update plus one residual term: with
``ΔX = X_fp − X_q``, ``H = 2/N·X_qᵀX_q`` and ``U`` the upper Cholesky factor of ``H⁻¹``, quantizing column ``i``
adds ``w_i · P[i, i:]`` to the later columns, ``P = α·triu(D·Uᵀ, 1)·U``, ``D = 2/N·ΔXᵀX_q`` — one (in, in)
matrix shared by every output row (the paper's neuron decomposition), so the extra cost is two (in, in) matmuls
per linear and the statistics pass.

The pipeline carries both streams (``run_sequential(fp_inputs=True)``): the full-precision hidden states of each
layer, and a floating-point snapshot of the layer taken before its first weight changes; ``LayerContext.
asym_hessians`` runs snapshot and quantized layer chunk by chunk in lockstep, true-sequentially (q/k/v, o, gate/up,
down), so ``X_q`` sees the parts of the layer already quantized and ``X_fp`` the FP layer on the FP stream, as in
the reference code. Memory beyond GPTQ: one more copy of the calibration hidden states (SmolLM2, 32 × 512 tokens:
37.7 MB), one decoder layer's weights (the snapshot) and one (in, in) matrix per linear group.

Paper defaults kept: ``α = 0.25`` (the reference code's scaling of ``P``), GPTQ's 1% dampening, 128-column lazy
blocks, act-order and true-sequential. As in the reference code, the in-block update multiplies ``P`` by the
column's value before rounding, and the lazy update of the columns after a block by what the block left in its
columns (the rounded values); ``rescomp`` documents the alternative. Deviation (shared with ``gptq``): a group's
range is taken from the columns as already updated inside the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.errors import ConfigError
from ptqbench.methods.rounding.gptq import GPTQ, Compensation, GPTQConfig
from ptqbench.pipeline import LayerContext
from ptqbench.stages import register_stage


@dataclass
class GPTAQConfig(GPTQConfig):
    alpha: float = 0.25  # weight of the asymmetric residual term P (reference code: 0.25)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"gptaq.alpha={self.alpha}: use a value in [0, 1] (paper: 0.25; 0 is GPTQ)")
        super().__post_init__()


@register_stage
class GPTAQ(GPTQ):
    """GPTAQ (Li et al., 2025): GPTQ fitted to the full-precision model's outputs (asymmetric calibration)."""

    name = "gptaq"
    supported_formats = ("int",)  # its extra terms are derived and tested on the integer grid
    config_cls = GPTAQConfig
    needs_fp_inputs = True
    paper = "https://arxiv.org/abs/2504.02692"
    config: GPTAQConfig

    def statistics(self, ctx: LayerContext, group: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return dict(ctx.asym_hessians(group))

    def compensation(self, name: str, w: torch.Tensor, extra: torch.Tensor | None) -> Compensation | None:
        return Compensation(asym=extra, alpha=self.config.alpha)
