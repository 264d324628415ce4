"""Rounding stages: how the weights are put on the grid (``ptqbench.stages.Rounding``)."""
