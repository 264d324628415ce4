"""Checks that refuse bad input before any work: value types against a dataclass's fields, counts, and a results
folder that cannot be written. Each raises a one-line ``ConfigError`` that says what to set instead."""

from __future__ import annotations

import os
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from ptqbench.errors import ConfigError

MIN_FREE_BYTES = 16 * 2**20  # a cell's files are tens of KiB; less free space than this means a full disk
_WHAT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``; None when the hint is too rich to judge here."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(h, value) for h in typing.get_args(hint)]
        return True if any(verdicts) else (None if None in verdicts else False)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int to Python, never to a config
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, (tuple, list))
    return None


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (tuple, list):
        return "a list, e.g. [a,b]"
    args = [h for h in typing.get_args(hint) if h is not type(None)] or [hint]
    words = [_describe(h) if typing.get_origin(h) in (tuple, list) else _WHAT.get(h, str(h)) for h in args]
    return " or ".join(words) + (" (or null)" if type(None) in typing.get_args(hint) else "")


def check_types(prefix: str, cls: type, values: dict[str, Any]) -> None:
    """Refuse a value whose type does not match the dataclass field it sets (``quant.sym=maybe``), naming the
    field and what it takes. Hydra parses ``=four`` as a string, so without this the dataclass would either
    accept it silently or fail deep inside with a comparison error."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and _accepts(hints[key], value) is False:
            raise ConfigError(f"{prefix}.{key}={value!r}: use {_describe(hints[key])}")


def positive_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> int | None:
    """``value`` as an int >= ``minimum`` (null allowed when ``allow_none``), or a ConfigError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        null = " or null" if allow_none else ""
        raise ConfigError(f"{name}={value!r}: use an integer >= {minimum}{null}")
    return value


def check_writable(folder: Path, key: str = "results_root") -> None:
    """Refuse a results folder that cannot be created or written, or whose disk is full, before any model is
    loaded: otherwise the whole cell would be computed and then lost when its rows are written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ptqbench-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"results folder {str(folder)!r} cannot be written ({e.strerror or type(e).__name__}): "
                          f"set {key}=<a writable folder>") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:  # an empty probe file fits on a full disk; the cell's rows would not
        raise ConfigError(f"results folder {str(folder)!r} is on a full disk ({free // 1024} KiB free): free some "
                          f"space or set {key}=<a folder on another disk>")
