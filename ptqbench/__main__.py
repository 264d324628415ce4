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
    from ptqbench.run import configure_threads, run

    configure_threads(cfg.get("runtime") or {})
    try:
        run(cfg)
    except ConfigError as e:  # a user error: one line, no traceback, non-zero exit
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    from ptqbench.recipe import register_hydra_recipes

    register_hydra_recipes()  # method=awq+gptq and every other recipe spelling compose like a conf/method file
    _hydra_main()


if __name__ == "__main__":
    main()
