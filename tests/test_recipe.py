"""Recipes: parsing, aliases, refusals, capabilities, config hashes, Hydra composition and the stage statistics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptqbench import run as run_mod
from ptqbench.errors import ConfigError
from ptqbench.quantizer import build_config, get_method
from ptqbench.recipe import ALIASES, RecipeSpec, parse_recipe, recipe_class, recipe_names
from ptqbench.scheme import QuantScheme
from ptqbench.stages import group_gram, hessian_blocks, stage_names

# the families the methods had before they became recipes (rows and reports group by them)
OLD_FAMILIES = {"rtn": "calibration-free", "gptq": "compensation", "awq": "salience/scaling",
                "smoothquant": "salience/scaling", "quarot": "rotation", "omniquant": "optimization",
                "hqq": "calibration-free", "mrgptq": "rotation", "dartquant": "rotation",
                "rptq": "reordering"}


@pytest.mark.parametrize("name,spec", [
    ("gptq", ("none", "minmax", "gptq")),
    ("awq", ("awq", "clip", "nearest")),
    ("awq+gptq", ("awq", "minmax", "gptq")),
    ("quarot+rtn", ("quarot", "minmax", "nearest")),
    ("smoothquant+gptq", ("smoothquant", "minmax", "gptq")),
    ("clip+gptq", ("none", "clip", "gptq")),
    ("omniquant", ("none", "lwc", "nearest")),
    ("none+omniquant+rtn", ("none", "lwc", "nearest")),  # synonyms resolve to the stage's own name
    ("lwc", ("none", "lwc", "nearest")),
    ("awq+clip+gptq", ("awq", "clip", "gptq")),
])
def test_parse(name, spec):
    assert parse_recipe(name) == RecipeSpec(*spec)


@pytest.mark.parametrize("name,match", [
    ("gptq+awq", "out of order"),
    ("clip+awq", "out of order"),
    ("awq+quarot", "out of order"),  # two transforms
    ("awq+foo", "unknown stage 'foo'"),
    ("awq++gptq", "not a recipe"),
    ("none+hqq+gptq", "use none\\+hqq\\+nearest"),
    ("lwc+gptq", "the lwc range fits"),
    ("quarot+awq", "out of order"),  # QuaRot's old inner=awq: not a recipe
])
def test_bad_recipes_are_refused_with_what_would_work(name, match):
    with pytest.raises(ConfigError, match=match):
        get_method(name)


def test_unknown_name_lists_everything():
    with pytest.raises(ConfigError) as e:
        get_method("nope")
    msg = str(e.value)
    assert "fp16" in msg and "pbllm" in msg and "awq" in msg and "transforms" in msg and "\n" not in msg


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_keep_their_names_and_families(alias):
    cls = get_method(alias)
    assert cls.name == alias and cls.family == OLD_FAMILIES[alias]
    assert cls.recipe == "+".join(ALIASES[alias])
    assert get_method(cls.recipe).recipe == cls.recipe and get_method(cls.recipe).name == cls.recipe


def test_capabilities_are_the_stages_intersection():
    assert recipe_class("awq+gptq").supported_a_bits == (16,)  # AWQ's scaling is weight-only
    assert recipe_class("quarot+gptq").supported_a_bits == (4, 8, 16)
    assert recipe_class("quarot+rtn").requires_calibration is False  # rotations need no data; GPTQ does
    assert recipe_class("quarot").requires_calibration is True
    assert recipe_class("hqq").requires_calibration is False and recipe_class("clip").requires_calibration
    with pytest.raises(ConfigError, match="the awq transform stage does not support a_bits=8"):
        recipe_class("awq+gptq")(QuantScheme(w_bits=4, group_size=-1, a_bits=8))
    with pytest.raises(ConfigError, match="asymmetric"):
        recipe_class("hqq")(QuantScheme(w_bits=4, group_size=64, sym=True))


def test_stage_params_are_typed_and_refused_by_name():
    cls = get_method("awq+gptq")
    cfg = build_config(cls, {"transform": {"alpha": 0.5}, "rounding": {"percdamp": 0.05}})
    assert cfg.transform.alpha == 0.5 and cfg.rounding.percdamp == 0.05 and cfg.range.to_dict() == {}
    with pytest.raises(ConfigError, match="per stage"):
        build_config(cls, {"alpha": 0.5})  # flat, as before the grid
    with pytest.raises(ConfigError, match=r"the gptq rounding stage has no parameter\(s\) \['nope'\]"):
        build_config(cls, {"rounding": {"nope": 1}})
    with pytest.raises(ConfigError, match="awq.alpha=2"):
        build_config(cls, {"transform": {"alpha": 2}})


def test_every_grid_spelling_is_registered():
    names = set(recipe_names())
    grid = {f"{t}+{r}+{q}" for t in stage_names("transform") for r in stage_names("range")
            for q in stage_names("rounding")}
    assert grid <= names and not (set(ALIASES) & names)
    assert {"awq+gptq", "quarot+rtn", "smoothquant+gptq", "clip"} <= names


def test_hydra_composes_recipes_and_the_hash_covers_the_resolved_recipe(compose):
    cfg = compose(["method=awq+gptq", "quant=w3g64", "method.params.rounding.percdamp=0.05"])
    assert cfg.method.params.transform.n_grid == 20 and cfg.method.params.rounding.percdamp == 0.05
    cell = run_mod.resolve(cfg)
    assert cell.method_cls.name == "awq+minmax+gptq" and cell.method_cfg.rounding.percdamp == 0.05
    # an alias and its spelled-out recipe are one cell; a stage parameter or another stage is another
    h = {o: run_mod.resolve(compose(o.split())).config_hash for o in (
        "method=gptq", "method=none+minmax+gptq", "method=minmax+gptq",
        "method=gptq method.params.rounding.percdamp=0.02", "method=none+clip+gptq")}
    assert h["method=gptq"] == h["method=none+minmax+gptq"] == h["method=minmax+gptq"]
    assert len({h["method=gptq"], h["method=gptq method.params.rounding.percdamp=0.02"],
                h["method=none+clip+gptq"]}) == 3
    assert run_mod.resolve(compose(["method=quarot+rtn", "quant=w4a4"])).calib is None  # no data drawn


def test_rows_carry_the_stages():
    assert run_mod._stage_columns(get_method("awq")) == {"transform": "awq", "range": "clip", "rounding": "nearest"}
    assert run_mod._stage_columns(get_method("pbllm")) == {"transform": "", "range": "", "rounding": ""}


def test_cli_refuses_an_invalid_recipe_before_any_work(tmp_path):
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "ptqbench", "method=none+hqq+gptq", f"results_root={tmp_path}"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "none+hqq+nearest" in errs[0], p.stderr
    assert not any(tmp_path.rglob("*.parquet"))


def test_hessian_blocks_are_the_group_grams():
    torch.manual_seed(0)
    x = torch.randn(300, 128)
    h = 2.0 / x.shape[0] * x.T @ x  # GPTQ's Hessian
    blocks = hessian_blocks(h, 32)
    assert blocks.shape == (4, 32, 32)
    assert torch.allclose(blocks, 2.0 / x.shape[0] * group_gram(x, 32), atol=1e-5)
