"""``mrgptq`` rounding: Micro-Rotated-GPTQ's GPTQ on the FP4 grid with format-specific scales.

Egiazarian, Castro, Kuznedelev, Panferov, Kurtić, Pandit, Marques, Kurtz, Ashkboos, Hoefler, Alistarh, "Bridging the
Gap Between Promise and Performance for Microscaling FP4 Quantization", 2025, https://arxiv.org/abs/2509.23202.
The alias ``mrgptq`` is ``mr+minmax+mrgptq``: block-wise Hadamard rotations of every quantized linear's input
(``methods/transform/microrotation.py``, block = the format's scale block), then this stage.

What it adds to ``gptq`` on an FP4 scheme (``quant=mxfp4`` / ``nvfp4`` and their W4A4 variants):

- block scales fitted once on the rotated weight, before the GPTQ pass (the reference code's order), so the
  blocks stay contiguous in the original column order that FP4 hardware reads while columns are processed in
  act-order (the plain ``gptq`` stage does the same on FP4 grids: ``gptq_quantize(fmt=...)``);
- MSE-searched block scales by default (``scale_search=mse``; ``ptqbench.fp4``): for MXFP4 the choice between the
  covering power of two and the next one down (the power-of-two rounding is where MXFP4 loses most, per the paper),
  for NVFP4 E4M3 scales shrunk by up to 30%; ``scheme`` follows the quant's own ``scale_search``.

Paper defaults kept: GPTQ's 1% dampening, 128-column lazy blocks, act-order; NVFP4's per-tensor scale
``amax / (6·448)`` of the rotated weight. Deviations (documented): the candidate sets of the MSE search are this
harness's (``ptqbench.fp4``), not the reference code's observer; no fused global scale across q/k/v or gate/up (a
fused-GEMM kernel detail: each linear keeps its own tensor scale).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptqbench.errors import ConfigError
from ptqbench.methods.rounding.gptq import GPTQ, GPTQConfig
from ptqbench.scheme import SCALE_SEARCHES
from ptqbench.stages import register_stage


@dataclass
class MRGPTQConfig(GPTQConfig):
    scale_search: str = "mse"  # FP4 block scales: mse (paper), minmax, or scheme (the quant's scale_search)

    def __post_init__(self) -> None:
        if self.scale_search not in (*SCALE_SEARCHES, "scheme"):
            raise ConfigError(f"mrgptq.scale_search={self.scale_search!r}: use mse (paper), minmax or scheme")
        super().__post_init__()


@register_stage
class MRGPTQ(GPTQ):
    """GPTQ on the FP4 grid with block scales fitted before the pass and MSE-searched (MR-GPTQ, Egiazarian et al.)."""

    name = "mrgptq"
    config_cls = MRGPTQConfig
    supported_formats = ("mxfp4", "nvfp4")
    paper = "https://arxiv.org/abs/2509.23202"
    config: MRGPTQConfig

    def fp4_scale_search(self) -> str:
        s = self.config.scale_search
        return self.scheme.scale_search if s == "scheme" else s
