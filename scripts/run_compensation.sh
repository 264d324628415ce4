#!/usr/bin/env bash
# The compensation / rounding family on the embedded SmolLM2-135M (offline, CPU), into results/compensation_smollm2:
#   conf/sweep/compensation_smollm2.yaml              W3 g64, W2 g64: fp16, rtn, gptq, gptaq, rescomp, foem,
#                                                     discquant, gwq (gradient salience)
#   conf/sweep/compensation_smollm2_gwq_hessian.yaml  W3 g64, W2 g64: gwq with the Hessian salience
#   conf/sweep/compensation_smollm2_w4a4.yaml         W4A4: quarot (QuaRot+GPTQ) vs quarot+gptaq
# then the table (perplexity per domain, effective bits, quantization time, peak memory).
# Usage: bash scripts/run_compensation.sh [extra hydra overrides, e.g. runtime.threads=1]
source "$(dirname "$0")/sweeps.sh"
run_sweeps "compensation_smollm2 compensation_smollm2_gwq_hessian compensation_smollm2_w4a4" "$@"
"$PY" -m ptqbench.results "${RESULTS_ROOT}/compensation_smollm2"
