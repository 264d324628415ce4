#!/usr/bin/env bash
# Microscaling FP4 on the embedded SmolLM2-135M (offline, CPU), into results/fp4_smollm2:
#   conf/sweep/fp4_smollm2.yaml      rtn, gptq, mrgptq x mxfp4, nvfp4 (weight-only), mxfp4a4, nvfp4a4 (W4A4)
#   conf/sweep/fp4_smollm2_int.yaml  fp16, rtn, gptq, quarot x w4g64, w4a4 (the integer references)
# then the table (perplexity per domain, effective bits, quantization time, peak memory).
# Usage: bash scripts/run_fp4.sh [extra hydra overrides, e.g. runtime.threads=1]
source "$(dirname "$0")/sweeps.sh"
run_sweeps "fp4_smollm2 fp4_smollm2_int" "$@"
"$PY" -m ptqbench.results "${RESULTS_ROOT}/fp4_smollm2"
