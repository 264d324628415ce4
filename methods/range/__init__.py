"""Range stages: how each group's scale and zero are chosen (``ptqbench.stages.RangeStage``)."""
