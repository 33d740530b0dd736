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

# Packages install with uv (pinned): the locked set in about 10-15 s where pip took 80 s on 2 cores (the
# quickstart's time, docs/task.md). uv does not read pip's configuration, so pip's indexes and find-links (pip.conf, PIP_*:
# e.g. a folder holding a CPU build of torch) are handed to it; with none set it reads PyPI, as pip would.
# unsafe-best-match: every index is searched for a pin, as pip does.
UV_VERSION := 0.13.9
pip_config = $(shell $(PY) -m pip config get $(1) 2>/dev/null)
UV_FLAGS := --python $(BIN)/python --quiet --index-strategy unsafe-best-match \
	$(addprefix --index-url ,$(firstword $(PIP_INDEX_URL) $(call pip_config,global.index-url))) \
	$(addprefix --extra-index-url ,$(PIP_EXTRA_INDEX_URL) $(call pip_config,global.extra-index-url)) \
	$(addprefix --find-links ,$(sort $(PIP_FIND_LINKS) $(call pip_config,global.find-links)))
INSTALL = $(BIN)/uv pip install $(UV_FLAGS)

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(BIN)/uv: $(BIN)/python
	$(BIN)/pip install -q uv==$(UV_VERSION)

# Stamp files so a second `make` does not reinstall.
$(VENV)/.installed: $(BIN)/uv pyproject.toml requirements.lock requirements-nodeps.lock
	$(INSTALL) -r requirements.lock
	$(INSTALL) --no-deps -r requirements-nodeps.lock
	$(INSTALL) --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.lock requirements-judge.lock requirements-judge-nodeps.lock
	$(INSTALL) -r requirements-test.lock
	$(INSTALL) -r requirements-judge.lock
	$(INSTALL) --no-deps -r requirements-judge-nodeps.lock
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
# the tiny model and SmolLM2-135M (its GGUF package, from the test install); 18 minutes on 2 idle cores (SmolLM2 already imported).
# Prints a table and, on its last line, one JSON object with every ratio (docs/benchmarks.md).
bench: $(VENV)/.installed-test
	$(INSTALL) -e '.[bench]'
	$(BIN)/python bench/vs_trl.py

# The peer on the same work (TRL is a bench-only extra): TRL's DPO and GRPO (the oracle as reward) from the
# SFT policy and pairs of a finished run (default: the quickstart's, OUT), judged by our eval beside ours. It
# trains our GRPO too (configs/rl_comparison.yaml's budget); a few minutes on the quickstart (docs/benchmarks.md).
bench-peer: install
	$(INSTALL) -e '.[bench]'
	$(BIN)/python bench/peer_quickstart.py $(OUT)

clean:
	rm -rf $(VENV) runs
