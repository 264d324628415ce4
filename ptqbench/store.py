"""Claims on cells of a results folder, so that processes sharing the folder compute each cell once.

Before computing a cell a process claims it: ``<results_dir>/cells/<config_hash>.claim`` holds the owner's host, pid
and a random token, and its modification time is the owner's heartbeat (a background thread touches it every
``heartbeat_s`` while the cell runs). Another process that finds a live claim skips the cell and comes back for it
later (``ptqbench.run.finish_deferred``); a claim is stale when its heartbeat is older than ``stale_after_s``, or at
once when its owner is a process of this host that no longer exists (a killed run). A stale claim is taken over.

Checking a claim and writing one happen under one short ``filelock.FileLock`` per results folder
(``cells/.store.lock``, kept: removing a lock file that another process may be waiting on would let two processes
hold "the" lock at once), so two processes can never both see a cell as free and both claim it. The claim is the
only thing that must be removed at the end; a killed run's claim is removed by whoever takes it over, or by the next
run that finds its cell already written (``clear_stale``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from ptqbench import results
from ptqbench.errors import ConfigError

log = logging.getLogger("ptqbench")

GUARD_TIMEOUT_S = 120.0  # the guard is held for milliseconds; waiting longer means a hung filesystem
_HELD: set[str] = set()  # tokens of the claims this process holds now


@dataclass(frozen=True)
class StoreSettings:
    """``store:`` in conf/config.yaml. Not part of the config hash: it changes who computes a cell, not its value."""

    stale_after_s: float = 600.0  # a claim whose heartbeat is older than this is taken over
    heartbeat_s: float = 30.0  # how often the owner refreshes its claim (well under stale_after_s)
    poll_s: float = 2.0  # how often a process waiting for another's cell looks again

    def __post_init__(self) -> None:
        for k in ("stale_after_s", "heartbeat_s", "poll_s"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"store.{k}={v!r}: use a positive number of seconds")
        if self.heartbeat_s >= self.stale_after_s:
            raise ConfigError(f"store.heartbeat_s={self.heartbeat_s} must be below store.stale_after_s="
                              f"{self.stale_after_s}, or a live claim would look stale between two heartbeats")


def claim_path(results_dir: str | os.PathLike, config_hash: str) -> Path:
    return results.cells_dir(results_dir) / f"{config_hash}.claim"


def _guard(results_dir: str | os.PathLike) -> FileLock:
    d = results.cells_dir(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    return FileLock(str(d / ".store.lock"), timeout=GUARD_TIMEOUT_S)


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The claim's owner record, or None when absent; an unreadable record (a torn write) reads as {}."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def claim_state(results_dir: str | os.PathLike, config_hash: str, settings: StoreSettings) -> str:
    """``free`` (no claim), ``live`` (another process is on it) or ``stale`` (its owner stopped)."""
    path = claim_path(results_dir, config_hash)
    owner = _read_owner(path)
    if owner is None:
        return "free"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "free"
    if age > settings.stale_after_s:
        return "stale"
    # a killed run on this host need not wait out the timeout: its pid is gone (pid reuse only delays the takeover,
    # except by this very process, which knows its own claims)
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not _pid_alive(owner["pid"]) or (owner["pid"] == os.getpid() and owner.get("token") not in _HELD):
            return "stale"
    return "live"


def _remove_leftovers(results_dir: str | os.PathLike, config_hash: str) -> None:
    """Temporary files of a killed writer of this cell (``.<hash>.parquet.<random>.tmp``): the claimant owns them."""
    for tmp in results.cells_dir(results_dir).glob(f".{config_hash}.*.tmp"):
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


class Claim:
    """A held claim on one cell: refreshed by a heartbeat thread until ``release()`` (or the ``with`` block ends)."""

    def __init__(self, results_dir: str | os.PathLike, config_hash: str, settings: StoreSettings) -> None:
        self.results_dir, self.config_hash, self.settings = Path(results_dir), config_hash, settings
        self.path = claim_path(results_dir, config_hash)
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                  "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)  # atomic: a reader sees the old claim or the new one, never half of one

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError as e:  # the claim was taken over (we looked stale) or the folder went away
                log.warning("cell %s: cannot refresh claim %s (%s)", self.config_hash, self.path, e)

    def start(self) -> "Claim":
        _HELD.add(self.token)
        self._write()
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.config_hash}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the claim, unless another process has since taken it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with _guard(self.results_dir):
                owner = _read_owner(self.path)
                if owner is not None and owner.get("token") == self.token:
                    self.path.unlink(missing_ok=True)
                elif owner is not None:
                    log.warning("cell %s: our claim was taken over by %s pid %s (our heartbeat looked stale): "
                                "raise store.stale_after_s", self.config_hash, owner.get("host"), owner.get("pid"))
        finally:
            _HELD.discard(self.token)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def try_claim(results_dir: str | os.PathLike, config_hash: str, settings: StoreSettings) -> Claim | None:
    """Claim a cell (taking over a stale claim); None when another live process holds it."""
    with _guard(results_dir):
        state = claim_state(results_dir, config_hash, settings)
        if state == "live":
            return None
        if state == "stale":
            owner = _read_owner(claim_path(results_dir, config_hash)) or {}
            log.warning("cell %s: taking over the stale claim of %s pid %s", config_hash, owner.get("host"),
                        owner.get("pid"))
        _remove_leftovers(results_dir, config_hash)
        return Claim(results_dir, config_hash, settings).start()


def clear_stale(results_dir: str | os.PathLike, config_hash: str, settings: StoreSettings) -> None:
    """Remove a stale claim (and its owner's temporary files) from a cell that needs no work: its owner was killed
    between writing the cell and releasing the claim."""
    if not claim_path(results_dir, config_hash).exists():  # the common case costs one stat, no lock
        return
    with _guard(results_dir):
        if claim_state(results_dir, config_hash, settings) == "stale":
            claim_path(results_dir, config_hash).unlink(missing_ok=True)
            _remove_leftovers(results_dir, config_hash)
