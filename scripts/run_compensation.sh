#!/usr/bin/env bash
# The compensation / rounding family on the embedded SmolLM2-135M (offline, CPU), into results/compensation_smollm2:
#   conf/sweep/compensation_smollm2.yaml              W3 g64, W2 g64: fp16, rtn, gptq, gptaq, rescomp, foem,
#                                                     discquant, gwq (gradient salience)
#   conf/sweep/compensation_smollm2_gwq_hessian.yaml  W3 g64, W2 g64: gwq with the Hessian salience
#   conf/sweep/compensation_smollm2_w4a4.yaml         W4A4: quarot (QuaRot+GPTQ) vs quarot+gptaq
# then the table (perplexity per domain, effective bits, quantization time, peak memory).
# Usage: bash scripts/run_compensation.sh [extra hydra overrides, e.g. runtime.threads=1]
# Completed cells are skipped on a rerun (config hash), so an interrupted run resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS_ROOT=${RESULTS_ROOT:-results}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
for part in compensation_smollm2 compensation_smollm2_gwq_hessian compensation_smollm2_w4a4; do
  echo "== +sweep=${part}"
  "$PY" -m ptqbench "+sweep=${part}" "results_root=${RESULTS_ROOT}" "$@"
done
"$PY" -m ptqbench.results "${RESULTS_ROOT}/compensation_smollm2"
