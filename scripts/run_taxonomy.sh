#!/usr/bin/env bash
# The whole PTQ taxonomy on the embedded SmolLM2-135M (offline, CPU): every method at its natural settings, into one
# results folder, then the table. Hydra's basic sweeper runs one product per call, so the union is four sweeps:
#   conf/sweep/taxonomy_smollm2.yaml       W4 g64, W3 g64 weight-only: fp16, rtn, gptq, awq, omniquant, hqq, quarot
#   conf/sweep/taxonomy_smollm2_w2.yaml    W2 g64: rtn, gptq, omniquant, and pbllm
#   conf/sweep/taxonomy_smollm2_w8a8.yaml  W8A8: rtn, smoothquant
#   conf/sweep/taxonomy_smollm2_w4a.yaml   W4A8, W4A4: rtn, quarot
# Usage: bash scripts/run_taxonomy.sh [extra hydra overrides, e.g. runtime.threads=1 force=true]
#        RESULTS_ROOT=results/current bash scripts/run_taxonomy.sh force=true     (what make regress-taxonomy runs)
# Completed cells are skipped on a rerun (config hash), so an interrupted run resumes. Measured on 2 CPU cores:
# 23 cells, about 50 minutes (RTN/HQQ cells ~1 min, GPTQ/AWQ/QuaRot/PB-LLM ~2-3 min, OmniQuant ~4.5 min).
source "$(dirname "$0")/sweeps.sh"
run_sweeps "taxonomy_smollm2 taxonomy_smollm2_w2 taxonomy_smollm2_w8a8 taxonomy_smollm2_w4a" "$@"
"$PY" -m ptqbench.results "${RESULTS_ROOT}/taxonomy_smollm2"
