"""``fp16``: the unquantized baseline (the model in its configured floating-point dtype)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ptqbench.models import linear_layers
from ptqbench.quantizer import MethodConfig, QuantResult, Quantizer, register
from ptqbench.scheme import FORMATS


@dataclass
class FP16Config(MethodConfig):
    """No hyperparameters."""


@register
class FP16(Quantizer):
    """Leaves every weight as loaded; the reference every quantized cell is compared with."""

    name = "fp16"
    supported_formats = FORMATS
    family = "baseline"
    config_cls = FP16Config
    requires_calibration = False
    supported_w_bits = (2, 3, 4, 5, 6, 7, 8, 16)  # any scheme: the baseline ignores it
    supported_a_bits = (3, 4, 8, 16)

    def quantize(self, model: nn.Module, calibration: object) -> QuantResult:
        return QuantResult(kept_fp=list(linear_layers(model)))
