"""PTQ recipes: a transform, a range and a rounding stage composed into one ``Quantizer``.

A method name is a recipe of stages joined by ``+`` in the order transform, range, rounding; omitted stages take
the defaults (``none``, ``minmax``, ``nearest``): ``awq+gptq`` is ``awq+minmax+gptq``, ``quarot+rtn`` is
``quarot+minmax+nearest``. The established method names are aliases of their recipes (``ALIASES``): ``gptq`` is
``none+minmax+gptq``, ``awq`` is ``awq+clip+nearest``. Whole formats that are not such a product (``fp16``,
``pbllm``) stay registered ``Quantizer`` classes of their own.

Stage parameters are typed dataclasses under ``method.params.<transform|range|rounding>.<field>``; the config hash
covers the resolved recipe (``Quantizer.recipe``) and every stage's parameters, so an alias and its spelled-out
recipe are the same cell. Recipes whose stages cannot work together are refused before any work
(``check_recipe``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import reduce
from typing import Any, ClassVar

from torch import nn
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError
from ptqbench.models import linear_layers
from ptqbench.pipeline import LayerContext, LayerwiseQuantizer, target_linears
from ptqbench.quantizer import MethodConfig, QuantResult, scheme_formats, set_linear_weight
from ptqbench.scheme import QuantizedWeight, QuantScheme
from ptqbench.stages import DEFAULTS, KINDS, RangeStage, Rounding, Stage, Transform, get_stage, stage_names, stages

# the established method names and the recipes they stand for (their numbers are these recipes' numbers)
ALIASES: dict[str, tuple[str, str, str]] = {
    "rtn": ("none", "minmax", "nearest"),
    "gptq": ("none", "minmax", "gptq"),
    "awq": ("awq", "clip", "nearest"),
    "smoothquant": ("smoothquant", "minmax", "nearest"),
    "quarot": ("quarot", "minmax", "gptq"),
    "omniquant": ("none", "lwc", "nearest"),
    "hqq": ("none", "hqq", "nearest"),
    "mrgptq": ("mr", "minmax", "mrgptq"),
    "dartquant": ("dartquant", "minmax", "gptq"),
    "rptq": ("rptq", "minmax", "gptq"),
}


@dataclass(frozen=True)
class RecipeSpec:
    """A parsed recipe: canonical stage names, in stage order."""

    transform: str
    range: str
    rounding: str

    @property
    def canonical(self) -> str:
        return f"{self.transform}+{self.range}+{self.rounding}"

    def stage_classes(self) -> tuple[type[Transform], type[RangeStage], type[Rounding]]:
        return (get_stage("transform", self.transform), get_stage("range", self.range),  # type: ignore[return-value]
                get_stage("rounding", self.rounding))


def grammar() -> str:
    return (f"a recipe is transform+range+rounding with stages omitted for their defaults; transforms "
            f"{stage_names('transform')}, ranges {stage_names('range')}, roundings {stage_names('rounding')}")


def parse_recipe(name: str) -> RecipeSpec:
    """``awq+gptq`` -> RecipeSpec('awq', 'minmax', 'gptq'); aliases resolve to their recipes."""
    if name in ALIASES:
        return RecipeSpec(*ALIASES[name])
    tokens = [t.strip() for t in name.split("+")]
    if not name or any(not t for t in tokens):
        raise ConfigError(f"method {name!r} is not a recipe: {grammar()}")
    chosen: dict[str, str] = {}
    pos = 0
    for tok in tokens:
        found = next((i for i in range(pos, len(KINDS)) if tok in stages(KINDS[i])), None)
        if found is None:
            kinds = [k for k in KINDS if tok in stages(k)]
            if kinds:
                raise ConfigError(f"method {name!r}: the {kinds[0]} stage {tok!r} is out of order (stages go "
                                  f"transform+range+rounding, one of each at most): {grammar()}")
            raise ConfigError(f"method {name!r}: unknown stage {tok!r}: {grammar()}")
        kind = KINDS[found]
        chosen[kind] = stages(kind)[tok].name  # synonyms (rtn, omniquant) to the stage's own name
        pos = found + 1
    return RecipeSpec(*(chosen.get(k, DEFAULTS[k]) for k in KINDS))


def check_recipe(spec: RecipeSpec) -> None:
    """Refuse stages that cannot work together, naming what would work."""
    t, r, q = spec.stage_classes()
    if q.level == "model" and (t.level == "layer" or r.layerwise or r.needs_inputs):
        what = f"the {t.name} transform" if t.level == "layer" else f"the {r.name} range"
        transforms = [n for n in stage_names("transform") if get_stage("transform", n).level != "layer"]
        ranges = [n for n in stage_names("range") if not (get_stage("range", n).layerwise
                                                         or get_stage("range", n).needs_inputs)
                  and get_stage("range", n).roundings in (None, (q.name,))]
        raise ConfigError(f"recipe {spec.canonical}: {q.name} rounds the whole model at once, and {what} needs the "
                          f"layer-by-layer calibration loop: use a transform in {transforms} and a range in {ranges}")
    if r.roundings is not None and q.name not in r.roundings:
        raise ConfigError(
            f"recipe {spec.canonical}: the {r.name} range fits its scales and zeros to the weight with "
            f"{'/'.join(r.roundings)} rounding, and {q.name} rewrites the weight after that fit: use "
            f"{spec.transform}+{r.name}+{r.roundings[0]}, or {q.name} with a range in "
            f"{[n for n in stage_names('range') if get_stage('range', n).roundings is None]}")


def recipe_family(t: type[Stage], r: type[Stage], q: type[Stage]) -> str:
    """A recipe's taxonomy family: its first stage that is not the default (transform, then range, then rounding)
    gives it, so every alias keeps its family (quarot: rotation, gptq: compensation, omniquant: optimization)."""
    for cls in (t, r, q):
        if cls.name != DEFAULTS[cls.kind]:
            return cls.family
    return q.family


def stage_a_bits(st: type[Stage], transform: type[Transform]) -> tuple[int, ...]:
    """The activation bit widths ``st`` takes in a recipe with ``transform``: its own, widened by those of a transform
    that attaches its own activation quantizers (the range and rounding stages only see weights then), unless ``st``
    is weight-only."""
    own = tuple(st.supported_a_bits)
    if st is transform or not transform.supplies_act_quant or own == (16,):
        return own
    return tuple(sorted(set(own) | set(transform.supported_a_bits)))


def _intersect(sets: list[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sorted(reduce(lambda a, b: set(a) & set(b), sets)))


@dataclass
class RecipeConfig(MethodConfig):
    """The typed parameters of each stage (``method.params.transform.<field>`` and so on)."""

    transform: MethodConfig
    range: MethodConfig
    rounding: MethodConfig


class Recipe(LayerwiseQuantizer):
    """A (transform, range, rounding) recipe. Concrete classes are made by ``recipe_class``."""

    recipe: ClassVar[str]
    stage_classes: ClassVar[tuple[type[Transform], type[RangeStage], type[Rounding]]]
    config_cls = RecipeConfig
    config: RecipeConfig

    def __init__(self, scheme: QuantScheme, config: MethodConfig | None = None) -> None:
        super().__init__(scheme, config if config is not None else self.make_config({}))
        t, r, q = self.stage_classes
        self.transform = t(scheme, self.config.transform)
        self.range = r(scheme, self.config.range)
        self.rounding = q(scheme, self.config.rounding)

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        for st in cls.stage_classes:
            for what, bits, ok in (("w_bits", scheme.w_bits, st.supported_w_bits),
                                   ("a_bits", scheme.a_bits, stage_a_bits(st, cls.stage_classes[0]))):
                if bits not in ok:
                    raise ConfigError(f"method {cls.name}: the {st.name} {st.kind} stage does not support "
                                      f"{what}={bits}: choose quant with {what} in {list(ok)}"
                                      + (" (it is weight-only)" if what == "a_bits" and ok == (16,) else ""))
            for fmt in scheme_formats(scheme):
                if fmt not in st.supported_formats:
                    raise ConfigError(f"method {cls.name}: the {st.name} {st.kind} stage knows only the "
                                      f"{list(st.supported_formats)} grids, not {fmt}: choose a quant in one of those, "
                                      f"or stages that support {fmt} (e.g. rtn, gptq)")
            st.check_scheme(scheme)

    @classmethod
    def make_config(cls, params: dict[str, Any]) -> RecipeConfig:
        """The recipe's typed config from ``{stage kind: {field: value}}``, refusing unknown keys by name."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(KINDS))
        if unknown:
            raise ConfigError(f"method {cls.name} has no parameter(s) {unknown}: its parameters are per stage, "
                              f"method.params.<{'|'.join(KINDS)}>.<field> ({cls.recipe})")
        built = {}
        for st in cls.stage_classes:
            p = dict(params.get(st.kind) or {})
            names = {f.name for f in dataclasses.fields(st.config_cls)}
            bad = sorted(set(p) - names)
            if bad:
                raise ConfigError(f"method {cls.name}: the {st.name} {st.kind} stage has no parameter(s) {bad}: "
                                  f"valid ones are {sorted(names)}")
            try:
                built[st.kind] = st.config_cls(**p)
            except TypeError as e:
                raise ConfigError(f"method {cls.name}, {st.kind} {st.name}: {e}") from None
        for st in cls.stage_classes:
            st.check_combination(cls.stage_classes, built[st.kind])
        return RecipeConfig(**built)

    @property
    def layerwise(self) -> bool:
        """Whether any stage needs the sequential calibration loop (else the linears are quantized directly)."""
        return (self.transform.level == "layer" or self.range.layerwise or self.range.needs_inputs
                or self.rounding.needs_loop)

    def prepare(self, model: nn.Module, calibration: Any) -> None:
        if self.transform.level == "model":
            self.transform.apply_model(model, calibration)
        self.rounding.prepare_model(model, calibration)

    @property
    def carries_fp_inputs(self) -> bool:
        return self.rounding.needs_fp_inputs

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        if self.transform.level == "layer":
            self.transform.apply_layer(ctx)
        if self.range.layerwise:
            self.range.fit_layer(ctx, list(ctx.targets))
        return self.rounding.quantize_layer(ctx, self.range)

    def quantize(self, model: nn.Module, calibration: Any) -> QuantResult:
        if self.requires_calibration and calibration is None:
            raise ValueError(f"method {self.name} needs calibration data")
        if self.rounding.level == "model":  # gradient-based rounding of every linear at once
            self.prepare(model, calibration)
            quant, keep = target_linears(model, self.scheme)
            result = QuantResult(kept_fp=keep)
            result.layers.update(self.rounding.quantize_model(model, calibration, self.range, quant))
        elif self.layerwise:
            result = super().quantize(model, calibration)  # prepare(), then the sequential pipeline
        else:  # nothing needs calibration inputs per layer: quantize every linear directly
            self.prepare(model, calibration)
            quant, keep = target_linears(model, self.scheme)
            mods = linear_layers(model)
            result = QuantResult(kept_fp=keep)
            for name in tqdm(quant, desc=self.name, leave=False):
                qw = self.range.nearest(name, self.range.prepare(name, mods[name].weight.data, None))
                set_linear_weight(mods[name], qw)
                result.layers[name] = qw
        for st in (self.transform, self.range, self.rounding):
            result.info.update(st.info())
        return result


_CLASSES: dict[str, type[Recipe]] = {}


def recipe_class(name: str) -> type[Recipe]:
    """The ``Quantizer`` class of a recipe or alias name (validated; cached). Its ``name`` is the alias, or the
    canonical recipe for a ``+`` name; its ``recipe`` is always the canonical recipe."""
    spec = parse_recipe(name)
    label = name if name in ALIASES else spec.canonical
    if label not in _CLASSES:
        check_recipe(spec)
        t, r, q = spec.stage_classes()
        papers = [c.paper for c in (t, r, q) if c.paper]
        _CLASSES[label] = type(f"Recipe[{label}]", (Recipe,), {
            "name": label, "recipe": spec.canonical, "stage_classes": (t, r, q),
            "family": recipe_family(t, r, q),
            "requires_calibration": any(c.requires_calibration for c in (t, r, q)),
            "supported_w_bits": _intersect([c.supported_w_bits for c in (t, r, q)]),
            "supported_a_bits": _intersect([stage_a_bits(c, t) for c in (t, r, q)]),
            "supported_formats": _intersect([c.supported_formats for c in (t, r, q)]),
            "paper": " ".join(dict.fromkeys(papers)),
            "__module__": __name__,
        })
    return _CLASSES[label]


def stage_defaults(spec: RecipeSpec) -> dict[str, dict[str, Any]]:
    """Each stage's default parameters, as the Hydra node of a recipe holds them."""
    return {cls.kind: dataclasses.asdict(cls.config_cls()) for cls in spec.stage_classes()}


def recipe_names() -> list[str]:
    """Every spelling of a recipe a user may type (all stage combinations, with and without omitted defaults and
    with stage synonyms), aliases excluded; the valid ones and the refused ones alike (refusal comes at resolve)."""
    options = {k: [None] + sorted(stages(k)) for k in KINDS}
    names = set()
    for t in options["transform"]:
        for r in options["range"]:
            for q in options["rounding"]:
                toks = [x for x in (t, r, q) if x is not None]
                if toks:
                    names.add("+".join(toks))
    return sorted(n for n in names if n not in ALIASES)
