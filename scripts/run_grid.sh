#!/usr/bin/env bash
# The taxonomy as a grid on the embedded SmolLM2-135M (offline, CPU): transform x range x rounding at W3 g64 and the
# weight-activation subset at W4A8, into results/grid_smollm2, then the transform x rounding tables.
#   conf/sweep/grid_smollm2.yaml        W3 g64: {none, smoothquant, awq, quarot} x {minmax, clip} x {nearest, gptq}
#   conf/sweep/grid_smollm2_w4a8.yaml   W4A8:   {none, smoothquant, quarot} x {minmax, clip} x {nearest, gptq}
# Usage: bash scripts/run_grid.sh [extra hydra overrides]
#        SEED_FROM=results/taxonomy_smollm2 bash scripts/run_grid.sh   (copy cells with the same config hash first)
# Completed cells are skipped on a rerun (config hash), so an interrupted run resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS_ROOT=${RESULTS_ROOT:-results}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
for part in grid_smollm2 grid_smollm2_w4a8; do
  echo "== +sweep=${part}"
  "$PY" -m ptqbench "+sweep=${part}" "results_root=${RESULTS_ROOT}" "$@"
done
"$PY" -m ptqbench.report "${RESULTS_ROOT}/grid_smollm2" --grid
