"""``foem`` rounding: FOEM — First-Order Error Matters: Accurate Compensation for Quantized Large Language Models.

Zheng, Qin, Li, Chu, Wang, Guo, Magno, Liu, AAAI 2026, https://arxiv.org/abs/2507.11017 (v2). ``method=foem`` =
``none+minmax+foem``.

GPTQ's update comes from a second-order Taylor expansion of the layer's output error around the current weights,
assuming the first-order term vanishes at a well-trained optimum. But GPTQ's progressive compensation moves the
not-yet-quantized (latent) weights away from the full-precision ones, so by the time a column is rounded the
gradient is no longer zero. FOEM keeps the first-order term in the optimal-brain-surgeon step (paper Eq. 13-14)
and approximates the gradient without backpropagation from the accumulated deviation, ``g ≈ β·(W − W_fp)·H``
(Eq. 15-18), so the Hessian cancels (Eq. 19): column ``i``'s propagated error becomes
``e_i = ((w_i − q_i) − β·(w_i − w_fp,i)) / U_ii`` and the latent weights are pulled back toward the
full-precision ones by ``β·(W − W_fp)``; the modified errors reach later blocks through GPTQ's lazy update
(Algorithm 1). Cost: a few elementwise operations per column on top of GPTQ.

Where the pull-back applies (``pullback``): Algorithm 1 writes it as ``−β(W_:,j − 𝕎_:,j)`` inside the block loop,
which the authors' maintained implementation (GPTQModel's FOEM, written with them) applies to the next column only:
that is the default, ``next``. ``block`` applies Eq. 19 literally to every remaining column of the block at every
step, so a column late in its block is pulled back up to 127 times; on random layers (tests/test_compensation.py)
it doubles GPTQ's output error, where ``next`` stays within a few percent of GPTQ's.

``W_fp`` is the weight the rounding starts from: the range stage's weight (clipped, for ``clip``), after any
transform. Defaults: ``β = 0.1`` (paper §3.3 and §4; its Table 6 finds β ≤ 0.5 helps; GPTQModel uses 0.2),
``pullback=next``, and GPTQ's (1% dampening, 128-column blocks, act-order, true-sequential). Deviations
(documented): the paper's first version and its old code used another first-order term
(``β·(W_F − W_fp,F)·H_F⁻¹``, ``β = 3e-4``), not offered; FOEM combined with GPTAQ's residual term (GPTQModel's
``alpha``) is not offered as a stage here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.errors import ConfigError
from ptqbench.methods.rounding.gptq import GPTQ, Compensation, GPTQConfig
from ptqbench.stages import register_stage


@dataclass
class FOEMConfig(GPTQConfig):
    beta: float = 0.1  # weight of the first-order term (paper §3.3: 0.1)
    pullback: str = "next"  # the -β(W - W_fp) pull-back on the next column (authors' GPTQModel) or the block's rest

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise ConfigError(f"foem.beta={self.beta}: use a value in [0, 1) (paper: 0.1; 0 is GPTQ)")
        if self.pullback not in ("next", "block"):
            raise ConfigError(f"foem.pullback={self.pullback!r}: use 'next' (default) or 'block' (Eq. 19 literally)")
        super().__post_init__()


@register_stage
class FOEM(GPTQ):
    """FOEM (Zheng et al., 2026): GPTQ with the first-order term of the accumulated compensation."""

    name = "foem"
    supported_formats = ("int",)  # its extra terms are derived and tested on the integer grid
    config_cls = FOEMConfig
    paper = "https://arxiv.org/abs/2507.11017"
    config: FOEMConfig

    def compensation(self, name: str, w: torch.Tensor, extra: torch.Tensor | None) -> Compensation | None:
        return Compensation(w_orig=w, first_order=self.config.beta, pullback=self.config.pullback)
