#!/usr/bin/env bash
# The taxonomy as a grid on the embedded SmolLM2-135M (offline, CPU): transform x range x rounding at W3 g64 and the
# weight-activation subset at W4A8, into results/grid_smollm2, then the transform x rounding tables.
#   conf/sweep/grid_smollm2.yaml        W3 g64: {none, smoothquant, awq, quarot} x {minmax, clip} x {nearest, gptq}
#   conf/sweep/grid_smollm2_w4a8.yaml   W4A8:   {none, smoothquant, quarot} x {minmax, clip} x {nearest, gptq}
# Usage: bash scripts/run_grid.sh [extra hydra overrides]
source "$(dirname "$0")/sweeps.sh"
run_sweeps "grid_smollm2 grid_smollm2_w4a8" "$@"
"$PY" -m ptqbench.report "${RESULTS_ROOT}/grid_smollm2" --grid
