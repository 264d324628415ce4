"""ptqbench: a reproducible benchmark harness for post-training quantization of LLMs."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout methods/, kernels/ and conf/ sit beside this package (design card); installed from a wheel
# they live inside it. Adding the checkout root to this package's search path makes `ptqbench.methods` and
# `ptqbench.kernels` resolve the same way in both layouts.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "methods" / "__init__.py").is_file() and not (Path(__file__).parent / "methods").is_dir():
    __path__.append(str(_ROOT))  # type: ignore[name-defined]  # noqa: F821


def conf_dir() -> Path:
    """The folder holding the Hydra configs, in a wheel or in a source checkout."""
    inside = Path(__file__).resolve().parent / "conf"
    return inside if inside.is_dir() else _ROOT / "conf"
