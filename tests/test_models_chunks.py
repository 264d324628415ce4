"""A GGUF shipped as chunk packages (Gemma 3 270M's layout) is assembled once into the cache, atomically."""

from __future__ import annotations

import hashlib
import sys
import textwrap

import pytest

from ptqbench import models
from ptqbench.errors import UnavailableError

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _make_package(root, name: str, sha: str) -> None:
    """A package with the chunk interface: MODEL_NAME and assemble(output_path, overwrite), sha256-checked."""
    pkg = root / name
    (pkg / "data").mkdir(parents=True)
    half = len(PAYLOAD) // 2
    (pkg / "data" / "m.gguf.part00").write_bytes(PAYLOAD[:half])
    (pkg / "data" / "m.gguf.part01").write_bytes(PAYLOAD[half:])
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        import hashlib
        from pathlib import Path
        MODEL_NAME = "m.gguf"
        CALLS = []
        def assemble(output_path, overwrite=False):
            CALLS.append(str(output_path))
            data = b"".join((Path(__file__).parent / "data" / f"m.gguf.part0{{i}}").read_bytes() for i in (0, 1))
            Path(output_path).write_bytes(data)
            if hashlib.sha256(data).hexdigest() != {sha!r}:
                raise ValueError("Assembled file sha256 did not match expected value")
            return Path(output_path)
    """))


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("chunked_pkg")]:
        del sys.modules[name]


def test_chunks_are_assembled_once_into_the_cache(chunked) -> None:
    _make_package(chunked / "site", "chunked_pkg_ok", hashlib.sha256(PAYLOAD).hexdigest())
    spec = models.ModelSpec(name="chunky", source="gguf_package", package="chunked_pkg_ok")
    path = models._gguf_path(spec)
    assert path == chunked / "cache" / "gguf" / "chunked_pkg_ok" / "m.gguf"
    assert path.read_bytes() == PAYLOAD
    assert models._gguf_path(spec) == path  # second call: already in the cache
    assert len(sys.modules["chunked_pkg_ok"].CALLS) == 1
    assert not list(path.parent.glob("*.tmp*"))


def test_bad_chunks_are_a_clear_error_and_leave_nothing(chunked) -> None:
    _make_package(chunked / "site", "chunked_pkg_bad", "0" * 64)
    spec = models.ModelSpec(name="chunky", source="gguf_package", package="chunked_pkg_bad")
    with pytest.raises(UnavailableError, match="could not assemble m.gguf .*reinstall"):
        models._gguf_path(spec)
    assert not list((chunked / "cache" / "gguf" / "chunked_pkg_bad").iterdir())
