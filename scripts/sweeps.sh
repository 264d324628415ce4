# Sourced by the scripts/run_*.sh drivers: the repository root as working directory, the offline environment, and
# run_sweeps "<sweep> [<sweep>...]" [extra hydra overrides], which runs each conf/sweep/<sweep>.yaml into
# ${RESULTS_ROOT:-results}. Completed cells are skipped on a rerun (config hash), so an interrupted run resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
RESULTS_ROOT=${RESULTS_ROOT:-results}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

run_sweeps() {
  local parts=$1
  shift
  for part in $parts; do
    echo "== +sweep=${part}"
    "$PY" -m ptqbench "+sweep=${part}" "results_root=${RESULTS_ROOT}" "$@"
  done
}
