"""PTQ methods, one file each (installed as ``ptqbench.methods``). Importing this package registers them all."""

import importlib
import pkgutil

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
