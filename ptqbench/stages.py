"""The three stage kinds of a PTQ recipe — transform, range, rounding — and their registries.

A recipe (``ptqbench.recipe``) is one stage of each kind, applied in that order:

- **transform**: a function-preserving change of the floating-point model (smoothing scales, rotations) that
  makes it easier to quantize. Model-level transforms run once before the layerwise pipeline; layer-level ones
  run inside it, on the layer's calibration inputs, before the range and rounding stages.
- **range**: how each group's scale and zero are chosen (min-max, a clip search, learned clipping, HQQ).
- **rounding**: how the weights are put on that grid (nearest, GPTQ's error-compensating order).

Each stage is a small class with its paper, a typed config dataclass (paper defaults, validated) and declared
capabilities, in one file under ``methods/transform/``, ``methods/range/`` or ``methods/rounding/``. Stages never
see Hydra objects and never run the calibration loop themselves: the pipeline owns the loop and the statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.quantizer import FAMILIES, MethodConfig
from ptqbench.scheme import QuantizedWeight, QuantScheme

if TYPE_CHECKING:
    from ptqbench.pipeline import LayerContext

KINDS = ("transform", "range", "rounding")
DEFAULTS = {"transform": "none", "range": "minmax", "rounding": "nearest"}


class Stage:
    """One stage of a recipe. Subclasses set the class attributes and implement their kind's hooks."""

    kind: ClassVar[str]
    name: ClassVar[str]
    synonyms: ClassVar[tuple[str, ...]] = ()  # other names a recipe may use for this stage (e.g. rtn = nearest)
    family: ClassVar[str]  # the taxonomy family this stage gives a recipe (see ``recipe.recipe_family``)
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    requires_calibration: ClassVar[bool] = False
    supported_w_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    supported_a_bits: ClassVar[tuple[int, ...]] = (4, 8, 16)
    supported_formats: ClassVar[tuple[str, ...]] = ("int",)  # value grids (quant.w_format / a_format) it can use

    def __init__(self, scheme: QuantScheme, config: MethodConfig | None = None) -> None:
        self.scheme = scheme
        self.config = config if config is not None else self.config_cls()
        self._info: dict[str, float] = {}  # facts a stage records while it runs, for ``info()``

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        """Extra scheme requirements of this stage (bit widths are checked by the recipe); raise ConfigError."""

    @classmethod
    def check_combination(cls, stages: tuple[type["Stage"], ...], config: MethodConfig) -> None:
        """Refuse, before any work, a combination with the recipe's other stages that this stage's ``config`` cannot
        run in (the recipe calls it once its typed configs are built); raise ConfigError naming what works."""

    def info(self) -> dict[str, float]:
        """Facts for the result rows (``info:<key>``), available after quantization."""
        return dict(self._info)


class Transform(Stage):
    """Function-preserving in floating point. ``level``: ``none``, ``model`` (before the layer loop, e.g. a
    rotation of the residual stream) or ``layer`` (inside it, on the layer's calibration inputs)."""

    kind = "transform"
    level: ClassVar[str] = "none"
    # attaches its own activation quantizers (RPTQ's per-cluster ranges): the recipe's range and rounding stages,
    # unless weight-only, then accept the activation bit widths it supports (e.g. a_bits=3)
    supplies_act_quant: ClassVar[bool] = False

    def apply_model(self, model: nn.Module, calibration: Any) -> None:
        """Model-level transforms: change ``model`` in place, its FP outputs unchanged."""

    def apply_layer(self, ctx: "LayerContext") -> None:
        """Layer-level transforms: change ``ctx.layer`` in place (its FP outputs unchanged). May leave input
        samples for the range stage in ``ctx.state["range_samples"][linear name]`` (tokens, in)."""


class RangeStage(Stage):
    """How each group's scale/zero is chosen.

    ``prepare`` is a weight-domain choice applied before any rounding (a clip search clamps the weight), so every
    rounding stage honours it; ``nearest`` fits the grid and rounds to nearest. A range whose parameters are fitted
    jointly with nearest rounding of the unchanged weight (HQQ, learned clipping) declares
    ``roundings = ("nearest",)``: a compensating rounding that rewrites the weights afterwards is refused.
    """

    kind = "range"
    roundings: ClassVar[tuple[str, ...] | None] = None  # rounding stages this range works with; None: any
    needs_inputs: ClassVar[bool] = False  # ``prepare`` needs the second moments of each linear's input
    layerwise: ClassVar[bool] = False  # ``fit_layer`` must run inside the calibration loop

    def fit_layer(self, ctx: "LayerContext", names: list[str]) -> None:
        """Fit per-layer range parameters for the linears ``names`` of ``ctx.layer`` before any rounding."""

    def prepare(self, name: str, w: torch.Tensor, stats: "InputStats | None") -> torch.Tensor:
        """The weight (out, in) that rounding will put on the grid; min-max ranges return it unchanged."""
        return w

    def nearest(self, name: str, w: torch.Tensor) -> QuantizedWeight:
        """Fit the grid to ``w`` (out, in) and round to nearest."""
        raise NotImplementedError


class Rounding(Stage):
    """How the weights are put on the grid.

    ``level="layer"`` (GPTQ and its descendants): ``quantize_layer`` quantizes one decoder layer's target linears in
    place through the range stage, inside the sequential calibration loop; ``needs_loop``: it needs that loop even
    with no other stage in it; ``needs_fp_inputs``: the loop also carries the full-precision model's inputs of each
    layer (``ctx.fp_inputs``, asymmetric calibration). ``level="model"`` (gradient-based rounding over the whole
    model, e.g. DiscQuant): ``quantize_model`` quantizes every target linear at once, with no layer loop; it cannot
    follow a layer-level transform or a range that needs the loop (refused by ``recipe.check_recipe``).
    ``prepare_model`` runs once before either, after any model-level transform (e.g. GWQ's gradients).
    """

    kind = "rounding"
    level: ClassVar[str] = "layer"
    needs_loop: ClassVar[bool] = False
    needs_fp_inputs: ClassVar[bool] = False

    def prepare_model(self, model: nn.Module, calibration: Any) -> None:
        """Whole-model statistics before any weight is rounded (the model is still floating point here)."""

    def quantize_layer(self, ctx: "LayerContext", rng: RangeStage) -> dict[str, QuantizedWeight]:
        raise NotImplementedError

    def quantize_model(self, model: nn.Module, calibration: Any, rng: RangeStage,
                       targets: list[str]) -> dict[str, QuantizedWeight]:
        """``level="model"``: quantize the linears ``targets`` (full names) of ``model`` in place; return them."""
        raise NotImplementedError


class InputStats:
    """Lazily computed input statistics of one layer's linears for a range stage.

    ``gram(name)`` is the per-group block diagonal of the input's second moment (n_groups, gs, gs), up to a
    positive factor: from the samples a layer-level transform left (AWQ's protocol: a strided token sample of the
    layer as it arrived, already scaled), else from the GPTQ Hessian ``2/N·XᵀX`` of the linear's shared-input group
    (all calibration tokens, computed once and shared with a GPTQ rounding).
    """

    def __init__(self, ctx: "LayerContext", group_size: int) -> None:
        self.ctx = ctx
        self.group_size = group_size
        self.hessians: dict[str, torch.Tensor] = {}
        self._grams: dict[int, torch.Tensor] = {}

    def add_hessians(self, hs: dict[str, torch.Tensor]) -> None:
        self.hessians.update(hs)

    def gram(self, name: str) -> torch.Tensor:
        samples = self.ctx.state.get("range_samples", {}).get(name)
        if samples is not None:
            key = id(samples)  # the linears of one group share one sample tensor: one Gram per group
            if key not in self._grams:
                self._grams[key] = group_gram(samples, self.group_size) / samples.shape[0]
            return self._grams[key]
        if name not in self.hessians:
            group = next(g for g in self.ctx.groups() if name in g)
            self.add_hessians(self.ctx.hessians([n for n in group if n in self.ctx.targets] or [name]))
        h = self.hessians[name]
        key = id(h)
        if key not in self._grams:
            self._grams[key] = hessian_blocks(h, self.group_size)
        return self._grams[key]


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group Gram matrices ``Σ x_gᵀ x_g`` (G, gs, gs) of inputs ``x`` (n, in): the block diagonal of ``XᵀX``."""
    n, in_f = x.shape
    gs = in_f if group_size == -1 else group_size
    xg = x.float().reshape(n, in_f // gs, gs).transpose(0, 1)  # (G, n, gs)
    return torch.bmm(xg.transpose(1, 2), xg)


def hessian_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks (G, gs, gs) of a Hessian (in, in), one per quantization group."""
    in_f = h.shape[0]
    gs = in_f if group_size == -1 else group_size
    idx = torch.arange(0, in_f, gs)
    return torch.stack([h[i: i + gs, i: i + gs] for i in idx]).float()


# ------------------------------------------------------------------------------------------------ registries
_STAGES: dict[str, dict[str, type[Stage]]] = {k: {} for k in KINDS}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add a stage to its kind's registry (names and synonyms unique within a kind)."""
    reg = _STAGES[cls.kind]
    for n in (cls.name, *cls.synonyms):
        if n in reg and reg[n] is not cls:
            raise ValueError(f"a {cls.kind} stage named {n!r} is already registered ({reg[n].__module__})")
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family={cls.family!r} is not one of {FAMILIES}")
    for n in (cls.name, *cls.synonyms):
        reg[n] = cls
    return cls


def stages(kind: str) -> dict[str, type[Stage]]:
    """Every registered stage of ``kind`` by name (synonyms included)."""
    import ptqbench.methods  # noqa: F401  (imports every stage module, which registers it)

    return dict(_STAGES[kind])


def stage_names(kind: str) -> list[str]:
    """The canonical names of the stages of ``kind`` (no synonyms), sorted."""
    return sorted({c.name for c in stages(kind).values()})


def get_stage(kind: str, name: str) -> type[Stage]:
    reg = stages(kind)
    if name not in reg:
        raise ConfigError(f"unknown {kind} stage {name!r}: choose one of {stage_names(kind)}")
    return reg[name]
