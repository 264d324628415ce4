"""Recipe names as Hydra configs: ``method=awq+gptq`` composes like a file in ``conf/method/``.

There are several hundred recipe spellings (every transform × range × rounding, with and without the omitted
defaults). Storing each as a node of Hydra's ConfigStore made every compose slow: Hydra deep-copies the whole store
once per compose (``CachingConfigRepository``), about 0.7 s with the recipes in it — paid by every cell of a sweep.
Instead a config source answers ``method/<recipe>`` on demand, and a search-path plugin puts it behind
``conf/`` (so the commented alias files there win). Both are registered by ``register_hydra_recipes()``, which
``python -m ptqbench`` calls before Hydra starts.
"""

from __future__ import annotations

from functools import lru_cache

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "method"


@lru_cache(maxsize=1)
def _names() -> frozenset[str]:
    from ptqbench.recipe import recipe_names

    return frozenset(recipe_names())


class RecipeConfigSource(ConfigSource):
    """``ptqbench-recipe://``: the group ``method`` holds one config per recipe spelling,
    ``{name: <recipe>, params: <every stage's defaults>}``, built when Hydra asks for it."""

    @staticmethod
    def scheme() -> str:
        return "ptqbench-recipe"

    @staticmethod
    def _recipe(config_path: str) -> str | None:
        group, _, name = config_path.strip("/").partition("/")
        name = name.removesuffix(".yaml")
        return name if group == GROUP and name in _names() else None

    def load_config(self, config_path: str) -> ConfigResult:
        name = self._recipe(config_path)
        if name is None:
            raise ConfigLoadError(f"{config_path} is not a recipe")
        from ptqbench.recipe import parse_recipe, stage_defaults

        node = OmegaConf.create({"name": name, "params": stage_defaults(parse_recipe(name))})
        return ConfigResult(config=node, path=self.full_path(), provider=self.provider, header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", GROUP)

    def is_config(self, config_path: str) -> bool:
        return self._recipe(config_path) is not None

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        path = config_path.strip("/")
        if path == "" and results_filter in (None, ObjectType.GROUP):
            return [GROUP]
        if path == GROUP and results_filter in (None, ObjectType.CONFIG):
            return sorted(_names())
        return []


class RecipeSearchPath(SearchPathPlugin):
    """Appends ``ptqbench-recipe://`` to every config search path (after ``conf/``)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="ptqbench-recipes", path=f"{RecipeConfigSource.scheme()}://")


def register_hydra_recipes() -> None:
    """Make every recipe name a ``method`` option for Hydra in this process (idempotent)."""
    plugins = Plugins.instance()
    plugins.register(RecipeConfigSource)
    plugins.register(RecipeSearchPath)
