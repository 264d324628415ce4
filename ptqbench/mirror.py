"""A local hub mirror: a folder laid out like the Hugging Face hub, ``<mirror>/<repo id>/<the repo's files>``, that
hub models and the hub text sources (``wikitext2``, ``c4``, ``ptb``, ``pile``) are read from instead of the network.

Set it with ``hub_mirror=<folder>`` on the command line or ``PTQBENCH_HUB_MIRROR=<folder>`` in the environment (the
config's default reads the variable). It says where the files live, not what is computed, so it is not part of the
config hash: a cell computed from the mirror and one computed from the hub share their hash. Unset (the default),
everything loads from the hub or the local Hugging Face caches exactly as without this module.

- a model ``model.path=<hub id>`` loads from ``<mirror>/<hub id>`` when that folder exists (a ``save_pretrained``
  or ``hf download --local-dir`` folder), else from the hub or its cache as before;
- a text source reads its split's files from ``<mirror>/<dataset repo id>/`` with the hub's file names (listed per
  source in ``ptqbench.data`` and in the README); a missing file stops the run with the path it looked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ptqbench.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)

ENV = "PTQBENCH_HUB_MIRROR"
# the mirror a run set for its cell (innermost last); empty: no run is active, so the environment variable decides
_ACTIVE: list[Path | None] = []


def check(value: object) -> Path | None:
    """The ``hub_mirror`` setting as a folder (None when unset), refused in one line when it is not one."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"hub_mirror={value!r}: use the path of a folder laid out like the hub, or null")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ConfigError(f"hub_mirror={value!r} is not a folder: give a folder laid out like the hub "
                          f"(<mirror>/<repo id>/<files>), or hub_mirror=null to use the hub")
    return root.resolve()


def current() -> Path | None:
    """The mirror in use: the one the running cell set, else ``$PTQBENCH_HUB_MIRROR``, else None (the hub)."""
    if _ACTIVE:
        return _ACTIVE[-1]
    return check(os.environ.get(ENV)) if os.environ.get(ENV) else None


@contextlib.contextmanager
def active(root: Path | None) -> Iterator[None]:
    """Use ``root`` (None: no mirror, whatever the environment says) while a cell runs."""
    _ACTIVE.append(root)
    try:
        yield
    finally:
        _ACTIVE.pop()


def files(repo: str, pattern: str) -> list[str]:
    """The files of ``<mirror>/<repo>/`` that match ``pattern`` (a hub file name, or a glob for sharded files),
    sorted; a one-line error naming the path looked for when there are none."""
    root = current()
    assert root is not None, "files() needs a mirror"
    found = sorted(str(p) for p in (root / repo).glob(pattern) if p.is_file())
    if not found:
        raise UnavailableError(f"the hub mirror has no {root / repo / pattern}: copy that file of the hub repo "
                               f"{repo} there (README: a local hub mirror), or set hub_mirror=null to use the hub")
    return found


def model_folder(path: str) -> Path | None:
    """``<mirror>/<path>`` for a hub id the mirror holds (a folder with config.json), else None."""
    root = current()
    if root is None or path.startswith(("/", ".", "~")):
        return None
    folder = root / path
    return folder if (folder / "config.json").is_file() else None
