"""``python -m ptqbench [overrides]``: a thin Hydra entry point around the pure ``ptqbench.run.run``."""

from __future__ import annotations

import logging
import os
import sys

# Runs never reach a hub unless the user says so: the embedded defaults work offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ptqbench import conf_dir  # noqa: E402
from ptqbench.errors import ConfigError  # noqa: E402

log = logging.getLogger("ptqbench")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from ptqbench.run import configure_threads, finish_deferred, run

    configure_threads(cfg.get("runtime") or {})
    worker = _launcher_worker()
    try:
        run(cfg)
        if worker:
            # a launcher's worker (joblib, submitit) never sees the sweep's end: a cell another process had
            # claimed is waited for here, at the end of this job, instead of in FinishLoggers.on_multirun_end
            finish_deferred()
    except ConfigError as e:  # a user error: one line, no traceback, non-zero exit
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _launcher_worker() -> bool:
    """Whether this job runs under a launcher other than Hydra's in-process one; also records the first job
    number this process runs as its rank (``PTQBENCH_RANK``: with several GPUs, each worker takes its own)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
        num, target = hc.job.get("num"), str(hc.launcher.get("_target_", ""))
    except Exception:  # noqa: BLE001 (no Hydra context, or a single run without a job number)
        return False
    if isinstance(num, int):
        os.environ.setdefault("PTQBENCH_RANK", str(num))
    return not target.endswith("BasicLauncher")


def one_line(message: str, max_options: int = 12) -> str:
    """Hydra's multi-line error as one line: the option lists joined by commas (a long one cut to its first
    ``max_options`` and its count: ``method`` alone has hundreds of recipe spellings), the config search path and
    the HYDRA_FULL_ERROR hint dropped (the hint is in the line we print instead)."""
    parts: list[str] = []
    options: list[str] | None = None  # the "Available options" list being read
    for raw in message.splitlines():
        line = raw.strip()
        if line.startswith("Config search path") or line.startswith("Set the environment variable HYDRA_FULL_ERROR"):
            break
        if not line:
            continue
        if raw.startswith("\t") and parts and parts[-1].endswith(":"):
            options = [line]
            parts[-1] += f" {line}"
        elif raw.startswith("\t") and options is not None:
            options.append(line)
            if len(options) <= max_options:
                parts[-1] += f", {line}"  # the next option of an "Available options" list
        else:
            _close(parts, options, max_options)
            options = None
            parts.append(line)
    _close(parts, options, max_options)
    return "; ".join(parts) or message.strip()


def _close(parts: list[str], options: list[str] | None, max_options: int) -> None:
    if options is not None and len(options) > max_options:
        hint = "; a recipe is transform+range+rounding, see methods/README.md" if "'method'" in parts[-1] else ""
        parts[-1] += f", ... ({len(options)} in all{hint})"


def _report_failed_cells() -> int:
    """One stderr line per cell that failed in this process; the exit status (1 when any failed)."""
    run_mod = sys.modules.get("ptqbench.run")
    failed = run_mod.failed_cells() if run_mod is not None else []
    for h, method, err in failed:
        print(f"failed cell {h} ({method}): {err.splitlines()[0] if err else ''}", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} cell(s) failed (recorded with status=failed; a rerun retries them)",
              file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    from hydra.errors import HydraException
    from ptqbench.hydra_recipes import register_hydra_recipes

    register_hydra_recipes()  # method=awq+gptq and every other recipe spelling compose like a conf/method file
    # Hydra prints its own errors (unknown option, malformed override, bad YAML) over many lines; let them reach us
    # instead, unless the user asked for Hydra's full trace
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException, YAMLError) as e:
        if full:
            raise
        print(f"error: {one_line(str(e))} (HYDRA_FULL_ERROR=1 shows the trace)", file=sys.stderr)
        sys.exit(2)
    sys.exit(_report_failed_cells())


if __name__ == "__main__":
    main()
