#!/usr/bin/env bash
# The GPU check (issue 16), for a Linux machine with one CUDA GPU and nothing else installed; about 10 minutes.
#
#   bash scripts/gpu_check.sh            # install the gpu extra, run the gpu tests, measure; last line: one JSON object
#   bash scripts/gpu_check.sh --dry-run  # check the environment and print the plan; installs and runs nothing
#
# It installs requirements-gpu.lock (vllm 0.32.0 on torch 2.13.0) into a fresh venv in $GPU_CHECK_WORK
# (default /tmp/rlhfkit-gpu-check), runs the GPU-marked tests (tests/test_gpu_engines.py), then
# scripts/gpu_check.py measure: GRPO and PPO on SmolLM2-135M-Instruct (the packaged GGUF) for a few steps with
# each rollout engine, and one JSON line with rollout tokens/s (hf vs vllm), training tokens/s, the update's MFU,
# peak GPU memory and the max and mean |rollout - training| log-prob per token. $PYTHON (default python3, 3.11
# as the lock) makes the venv. The installs need a package index (PyPI, or pip's usual PIP_INDEX_URL /
# PIP_FIND_LINKS for a local wheelhouse).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/rlhfkit-gpu-check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-600}

if [ "${1:-}" = "--dry-run" ]; then
  exec "$PY" scripts/gpu_check.py plan --work "$WORK"
fi
if [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2
  exit 2
fi

# 1. the environment, before anything is installed (no GPU, no lock: stop now)
"$PY" scripts/gpu_check.py plan --work "$WORK" --require

# 2. the gpu extra in a fresh venv (requirements-gpu.lock pins the whole environment)
rm -rf "$WORK/venv"
mkdir -p "$WORK"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q -r requirements-gpu.lock
"$VPY" -m pip install -q --no-deps -r requirements-judge-nodeps.lock
"$VPY" -m pip install -q --no-deps -e .
echo "[gpu_check] installed in ${SECONDS}s"

# 3. the GPU-marked tests (their summary goes into the JSON line; a failure does not stop the measurements)
export RLHFKIT_CACHE="$WORK/cache" TOKENIZERS_PARALLELISM=false
set +e
timeout 240 "$VPY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engines.py 2>&1 | tee "$WORK/pytest.log"
set -e
SUMMARY=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$WORK/pytest.log" | tail -1 | tr -d '=' | xargs || true)
echo "[gpu_check] gpu tests done at ${SECONDS}s: ${SUMMARY}"

# 4. the measurements, in what is left of the budget; the last line printed is the JSON object
LEFT=$(( BUDGET_S - SECONDS - 10 ))
exec "$VPY" scripts/gpu_check.py measure --work "$WORK" --pytest-summary "$SUMMARY" --budget-s "$LEFT"
