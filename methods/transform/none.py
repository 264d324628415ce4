"""``none`` transform: the model as it is (the default of every recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import FORMATS
from ptqbench.stages import Transform, register_stage


@dataclass
class NoTransformConfig(MethodConfig):
    """No parameters."""


@register_stage
class NoTransform(Transform):
    """Leaves the floating-point model unchanged."""

    name = "none"
    supported_formats = FORMATS  # an equivalence in floating point: any grid after it
    family = "calibration-free"
    config_cls = NoTransformConfig
    level = "none"
