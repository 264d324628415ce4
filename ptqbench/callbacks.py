"""Hydra callbacks at the end of a run or multirun: first the cells deferred because another process had claimed
them (``ptqbench.run.finish_deferred``), then each sweep's results published to the experiment logger."""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback


class FinishLoggers(Callback):
    """Calls ``ptqbench.run.finish_loggers`` at the end of a single run and of a multirun."""

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        _finish()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        _finish()


def _finish() -> None:
    run = sys.modules.get("ptqbench.run")
    if run is None:  # no cell ran in this process (a launcher's workers ran them): nothing deferred, no logger
        return
    run.finish_deferred()
    run.finish_loggers()
