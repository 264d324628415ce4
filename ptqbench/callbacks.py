"""Hydra callbacks: publish each sweep's results to the experiment logger once the run or multirun ends."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback


class FinishLoggers(Callback):
    """Calls ``ptqbench.run.finish_loggers`` at the end of a single run and of a multirun."""

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        from ptqbench.run import finish_loggers

        finish_loggers()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from ptqbench.run import finish_loggers

        finish_loggers()
