"""ptqbench: a reproducible benchmark harness for post-training quantization of LLMs."""

from __future__ import annotations

import warnings
from pathlib import Path

__version__ = "0.1.0"

# In a source checkout methods/, kernels/ and conf/ sit beside this package (design card); installed from a wheel
# they live inside it. Adding the checkout root to this package's search path makes `ptqbench.methods` and
# `ptqbench.kernels` resolve the same way in both layouts.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "methods" / "__init__.py").is_file() and not (Path(__file__).parent / "methods").is_dir():
    __path__.append(str(_ROOT))  # type: ignore[name-defined]  # noqa: F821

# conf/hydra/launcher/{joblib,submitit_slurm,submitit_local}.yaml keep the plugins' names (users type
# hydra/launcher=joblib) and are complete configs; Hydra 1.3 still validates them against the plugins' schemas of the
# same name, which is welcome, but warns about it on every run and in every launcher worker (which imports this
# package before composing its job's config)
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*' is validated against ConfigStore schema",
                        category=UserWarning)


def conf_dir() -> Path:
    """The folder holding the Hydra configs, in a wheel or in a source checkout."""
    inside = Path(__file__).resolve().parent / "conf"
    return inside if inside.is_dir() else _ROOT / "conf"
