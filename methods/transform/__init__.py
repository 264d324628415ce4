"""Transform stages: function-preserving changes of the floating-point model (``ptqbench.stages.Transform``)."""
