"""Experiment trackers fed by the run loop: ``none`` (the default) or Weights & Biases.

The results store stays the source of truth; a logger mirrors it. ``make_logger(cfg, sweep_name, results_dir)``
returns a :class:`Logger`; the run loop calls ``log_cell(config, rows)`` after each cell and
``finish_sweep(results_df)`` once at the end. W&B is optional (``pip install wandb``) and imported only when
``logger=wandb`` is chosen; it runs offline by default, so no account is needed (``wandb sync`` uploads later).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from ptqbench.errors import ConfigError, UnavailableError

MODES = ("offline", "online", "disabled")


class Logger:
    """The logger interface; this base does nothing, which is exactly the ``none`` logger."""

    def log_cell(self, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Record one finished cell: its resolved config and its result rows."""

    def finish_sweep(self, results_df: pd.DataFrame) -> None:
        """Record the sweep's results table once all cells are done."""


class NullLogger(Logger):
    """``logger=none``: results go to the store only."""


@dataclass
class WandbSettings:
    """The keys of ``conf/logger/wandb.yaml``."""

    name: str = "wandb"
    project: str = "ptqbench"
    entity: str | None = None
    mode: str = "offline"
    dir: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"logger.mode={self.mode!r}: use one of {', '.join(MODES)}")
        self.tags = [str(t) for t in (self.tags or [])]


def _row_key(row: Mapping[str, Any]) -> str:
    """``metric/dataset/group`` without empty parts: the name of a value in the W&B summary."""
    parts = [row.get("metric"), row.get("dataset"), row.get("group")]
    return "/".join(str(p) for p in parts if p not in (None, "") and not (isinstance(p, float) and math.isnan(p)))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _run_name(config: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """``method-scheme-calib-s<seed>``, from the rows (flat and always present) or else the config."""
    def pick(key: str) -> str:
        v = row.get(key, config.get(key))
        if isinstance(v, Mapping):  # a config group: its name
            v = v.get("name")
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)

    seed = pick("seed")
    parts = [pick("method"), pick("quant"), pick("calib")] + ([f"s{seed.split('.')[0]}"] if seed else [])
    return "-".join(p for p in parts if p) or "cell"


class WandbLogger(Logger):
    """One W&B run per cell (config + metrics in its summary), grouped by sweep; a results table per sweep."""

    def __init__(self, settings: WandbSettings, sweep_name: str, results_dir: str | os.PathLike, wandb: Any):
        self.s = settings
        self.sweep = sweep_name
        self.wandb = wandb
        # W&B's own files (offline runs) beside the results unless told otherwise; $WANDB_DIR is honoured
        self.dir = settings.dir or os.environ.get("WANDB_DIR") or str(results_dir)
        Path(self.dir).mkdir(parents=True, exist_ok=True)

    def _init(self, **kw: Any) -> Any:
        wb = self.wandb
        opts = {"console": "off"}  # never wrap the run loop's stdout/stderr
        if "x_disable_stats" in getattr(wb.Settings, "model_fields", {}):
            opts["x_disable_stats"] = True  # no system-metrics sampler per cell: faster, nothing to show offline
        return wb.init(project=self.s.project, entity=self.s.entity, mode=self.s.mode, dir=self.dir,
                       group=self.s.group or self.sweep, reinit="create_new", settings=wb.Settings(**opts), **kw)

    def log_cell(self, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        first = rows[0] if rows else {}
        summary: dict[str, Any] = {}
        for r in rows:
            key = _row_key(r)
            if r.get("status", "ok") == "ok" and _finite(r.get("value")):
                summary[key] = float(r["value"])
            else:  # NaN is not JSON: record why the value is absent instead
                summary[f"status/{key}"] = str(r.get("status") or "missing")
        statuses = {str(r.get("status") or "ok") for r in rows}
        summary["cell/status"] = next((s for s in ("failed", "diverged", "skipped") if s in statuses), "ok")
        for k in ("config_hash", "wall_s"):
            if first.get(k) is not None:
                summary[f"cell/{k}"] = first[k]
        tags = self.s.tags + [str(first[k]) for k in ("method", "quant", "family") if first.get(k)]
        try:
            config = _as_dict(config)
            run = self._init(name=_run_name(config, first), job_type="cell", config=config,
                             tags=sorted(set(tags)))
            run.summary.update(summary)
            run.finish()
        except Exception as e:  # noqa: BLE001 -- the store has the results; a tracker hiccup must not stop a sweep
            warnings.warn(f"W&B logging of cell {first.get('config_hash', '?')} failed: {type(e).__name__}: {e} "
                          "(the results store is unaffected)", stacklevel=2)

    def finish_sweep(self, results_df: pd.DataFrame) -> None:
        # W&B tables take plain Python values: missing as None, everything else as is
        df = results_df.astype(object).where(results_df.notna(), None)
        try:
            run = self._init(name=f"{self.sweep}-results", job_type="sweep-results")
            n_cells = int(results_df["config_hash"].nunique()) if "config_hash" in results_df else len(results_df)
            failed = results_df.get("status", pd.Series(dtype=object)) == "failed"
            run.log({"results": self.wandb.Table(dataframe=df)})
            run.summary.update({"sweep/cells": n_cells, "sweep/rows": len(results_df),
                                "sweep/failed_rows": int(failed.sum())})
            run.finish()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"W&B logging of sweep {self.sweep} results failed: {type(e).__name__}: {e}", stacklevel=2)
        # finish() may return before the service has flushed the offline run files; shutting the service down
        # waits for it, so the sweep's runs are complete on disk (ready for `wandb sync`) when this returns
        teardown = getattr(self.wandb, "teardown", None)
        if teardown is not None:
            teardown()


def _as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf node (the run loop may pass either)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:
        pass
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"logger config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def make_logger(logger_cfg: Mapping[str, Any] | None, sweep_name: str, results_dir: str | os.PathLike) -> Logger:
    """The logger ``logger_cfg`` asks for (``conf/logger/*.yaml``); None or ``name: none`` gives a NullLogger."""
    cfg = _as_dict(logger_cfg)
    name = cfg.get("name") or "none"
    if name == "none":
        return NullLogger()
    if name != "wandb":
        raise ConfigError(f"logger={name!r} is not known: use logger=none or logger=wandb")
    known = {f.name for f in fields(WandbSettings)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"logger=wandb has unknown key(s) {unknown}; known: {sorted(known)}")
    settings = WandbSettings(**cfg)
    try:
        import wandb  # optional: only this logger needs it
    except ImportError:
        raise UnavailableError("logger=wandb needs the wandb package: pip install wandb "
                               "(or pip install 'ptqbench[wandb]'), or run with logger=none") from None
    return WandbLogger(settings, sweep_name, results_dir, wandb)
