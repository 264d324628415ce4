"""The ``Quantizer`` interface, method configs and the registry.

A method is one file in ``methods/``: a typed config dataclass (paper defaults, validated in ``__post_init__``)
and a ``Quantizer`` subclass that declares its capabilities as class attributes and is registered with
``@register``. Methods never see Hydra objects: ``run`` builds the config from a plain dict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ptqbench.errors import ConfigError, UnavailableError
from ptqbench.scheme import QuantizedWeight, QuantScheme

if TYPE_CHECKING:
    from ptqbench.data import Calibration

FAMILIES = (
    "baseline",
    "calibration-free",
    "compensation",
    "salience/scaling",
    "rotation",
    "reordering",
    "optimization",
    "binarization",
)


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses add fields with the paper's defaults."""

    def __post_init__(self) -> None:  # subclasses validate and call super().__post_init__()
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QuantResult:
    """What ``Quantizer.quantize`` returns besides changing the model in place."""

    layers: dict[str, QuantizedWeight] = field(default_factory=dict)  # full linear name -> quantized form
    kept_fp: list[str] = field(default_factory=list)  # linear names left in floating point
    info: dict[str, Any] = field(default_factory=dict)  # method facts for the rows (e.g. rotation kind)

    def effective_bits(self) -> float:
        """Average storage bits per weight over the quantized linears (codes, scales, zeros, extras)."""
        n = sum(q.qweight.numel() for q in self.layers.values())
        return sum(q.storage_bits() for q in self.layers.values()) / n if n else 16.0


class Quantizer(ABC):
    """One PTQ method. Subclasses set the class attributes below and implement ``quantize``."""

    name: ClassVar[str]
    family: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    requires_calibration: ClassVar[bool] = False
    supported_w_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    supported_a_bits: ClassVar[tuple[int, ...]] = (16,)
    supported_formats: ClassVar[tuple[str, ...]] = ("int",)  # value grids (quant.w_format / a_format) it can use
    required_packages: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""

    def __init__(self, scheme: QuantScheme, config: MethodConfig | None = None) -> None:
        self.check_scheme(scheme)
        self.scheme = scheme
        self.config = config if config is not None else self.config_cls()

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        """Refuse bit widths the method does not support, before any model is loaded."""
        if scheme.w_bits not in cls.supported_w_bits:
            raise ConfigError(
                f"method {cls.name} does not support w_bits={scheme.w_bits}: choose quant with w_bits in "
                f"{list(cls.supported_w_bits)}"
            )
        if scheme.a_bits not in cls.supported_a_bits:
            raise ConfigError(
                f"method {cls.name} does not support a_bits={scheme.a_bits} (weight-only methods take a_bits=16): "
                f"choose quant with a_bits in {list(cls.supported_a_bits)}"
            )
        for fmt in scheme_formats(scheme):
            if fmt not in cls.supported_formats:
                raise ConfigError(f"method {cls.name} knows only the {list(cls.supported_formats)} grids, not {fmt}: "
                                  f"choose a quant in one of those, or a method that supports {fmt} (e.g. rtn, gptq)")

    @classmethod
    def validate_environment(cls) -> None:
        """Name the missing package, if any, before any work."""
        for pkg in cls.required_packages:
            if importlib.util.find_spec(pkg) is None:
                raise UnavailableError(f"method {cls.name} needs the package {pkg!r}: pip install {pkg}")

    @abstractmethod
    def quantize(self, model: nn.Module, calibration: "Calibration | None") -> QuantResult:
        """Change ``model`` in place to its fake-quantized form and return what was quantized."""


_REGISTRY: dict[str, type[Quantizer]] = {}


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: add a method to the registry (names are unique)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a quantizer named {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__})")
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family={cls.family!r} is not one of {FAMILIES}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Quantizer]]:
    """Every method a user can name without ``+``: the whole methods and the aliases of recipes."""
    import ptqbench.methods  # noqa: F401  (imports every method module, which registers it)
    from ptqbench.recipe import ALIASES, recipe_class

    return {**_REGISTRY, **{a: recipe_class(a) for a in ALIASES}}


def get_method(name: str) -> type[Quantizer]:
    """A whole method (``fp16``, ``pbllm``), an alias (``gptq``, ``awq``...) or a recipe (``awq+gptq``)."""
    import ptqbench.methods  # noqa: F401
    from ptqbench.recipe import recipe_class

    if name in _REGISTRY:
        return _REGISTRY[name]
    if "+" not in name:
        from ptqbench.recipe import ALIASES, grammar
        from ptqbench.stages import KINDS, stages

        if name not in ALIASES and not any(name in stages(k) for k in KINDS):
            raise ConfigError(f"unknown method {name!r}: choose a whole method {sorted(_REGISTRY)}, an alias "
                              f"{sorted(ALIASES)}, or a recipe ({grammar()})")
    return recipe_class(name)


def build_config(cls: type[Quantizer], params: dict[str, Any]) -> MethodConfig:
    """The method's typed config from a plain dict, refusing unknown keys by name."""
    make = getattr(cls, "make_config", None)
    if make is not None:  # recipes: one typed config per stage
        return make(params)
    names = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ConfigError(f"method {cls.name} has no parameter(s) {unknown}: valid ones are {sorted(names)}")
    try:
        return cls.config_cls(**params)
    except TypeError as e:
        raise ConfigError(f"method {cls.name}: {e}") from None


def scheme_formats(scheme: QuantScheme) -> list[str]:
    """The value grids a scheme uses: the weights' format, and the activations' when they are quantized."""
    fmts = [] if scheme.w_bits >= 16 else [scheme.w_format]
    if scheme.a_bits < 16 and scheme.a_format not in fmts:
        fmts.append(scheme.a_format)
    return fmts


def set_linear_weight(linear: nn.Linear, qw: QuantizedWeight) -> None:
    """Replace a linear's weight by the dequantized form of ``qw`` (what the packed kernels compute)."""
    with torch.no_grad():
        linear.weight.copy_(qw.dequantize().to(linear.weight.device, linear.weight.dtype))
