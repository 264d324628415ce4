"""PTQ methods (installed as ``ptqbench.methods``). Importing this package registers them all.

Recipe stages live one file each in ``transform/``, ``range/`` and ``rounding/`` (``ptqbench.stages``); whole
methods that are not a (transform, range, rounding) recipe (``fp16``, ``pbllm``) are files at this level.
"""

import importlib
import pkgutil

for _mod in sorted(m.name for m in pkgutil.walk_packages(__path__, prefix=f"{__name__}.")):
    if not _mod.rsplit(".", 1)[-1].startswith("_"):
        importlib.import_module(_mod)
