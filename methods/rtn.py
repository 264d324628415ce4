"""``rtn``: round-to-nearest with a min-max range per group, the baseline of every PTQ paper."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ptqbench.models import linear_layers
from ptqbench.pipeline import target_linears
from ptqbench.quantizer import MethodConfig, QuantResult, Quantizer, register, set_linear_weight
from ptqbench.scheme import rtn_quantize


@dataclass
class RTNConfig(MethodConfig):
    """RTN has no hyperparameters beyond the scheme (bits, group size, symmetry)."""


@register
class RTN(Quantizer):
    """Round each weight to the nearest level of its group's min-max grid; needs no calibration data."""

    name = "rtn"
    family = "calibration-free"
    config_cls = RTNConfig
    requires_calibration = False
    supported_w_bits = (2, 3, 4, 5, 6, 7, 8)
    supported_a_bits = (4, 8, 16)  # activations are quantized naively when the scheme asks (a baseline too)

    @torch.no_grad()
    def quantize(self, model: nn.Module, calibration: object) -> QuantResult:
        quant, keep = target_linears(model, self.scheme)
        mods = linear_layers(model)
        result = QuantResult(kept_fp=keep)
        for name in tqdm(quant, desc="rtn", leave=False):
            qw = rtn_quantize(mods[name].weight.data, self.scheme.w_bits, self.scheme.group_size, self.scheme.sym)
            set_linear_weight(mods[name], qw)
            result.layers[name] = qw
        return result
