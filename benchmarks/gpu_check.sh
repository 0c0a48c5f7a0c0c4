#!/usr/bin/env bash
# The CUDA path of gaugefix, checked and timed on one GPU machine from bare (issue 22, item 4):
# installs the carried wheels and the project (PYTHONPATH=src), then runs
# benchmarks/gpu_check.py, which writes every figure and pass/fail to $OUT/gpu_check.json
# (./gpu_check.json without $OUT) and a timestamped log beside it. Exit 1 if any check did not
# pass. Target: under 8 minutes on one H200, the install included.
#
# Once, in the checkout the session was started in (the device tool sends that one), with this
# script committed there:
#     bash benchmarks/gpu_wheels.sh          # lapx, gguf, pydantic (+ needs) into .whl/, ~7 MB
# then the device call (tool `run`):
#     command:   bash benchmarks/gpu_check.sh
#     carry:     [".whl"]
#     timeout_s: 540
# The checks stop starting new steps once their 450 s budget is spent (GPU_CHECK_BUDGET=S to
# change it); what a cut-short run did is in the JSON all the same.
#
# Dry run here, on the CPU with tiny models and the same code paths except CUDA (torchrun with
# gloo, also with 2 processes):
#     GPU_CHECK_DRY=1 PYTHON=/work/main/.venv/bin/python OMP_NUM_THREADS=1 \
#         bash benchmarks/gpu_check.sh          # or: bash benchmarks/gpu_check.sh --dry-run
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing outside the device machine answers

dry=${GPU_CHECK_DRY:-0}
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then dry=1; fi
done

start=$(date +%s.%N)
echo "[$(date +%H:%M:%S)] gpu_check.sh: install (python: $(command -v "$PY"))"
if [ "$dry" != 1 ]; then
    nvidia-smi -L || echo "nvidia-smi: not available"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .whl/ here: run benchmarks/gpu_wheels.sh and carry .whl" >&2
    fi
fi
# the project itself: its source tree (nothing to build; `python -m gaugefix` is the CLI)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import lap, blake3, gguf, pydantic, gaugefix.cli; print('imports ok:', gaugefix.__file__)" \
    || echo "imports FAILED (the checks will say where)" >&2
end=$(date +%s.%N)
install_s=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
echo "[$(date +%H:%M:%S)] gpu_check.sh: installed in ${install_s} s"

budget=()
if [ -n "${GPU_CHECK_BUDGET:-}" ]; then budget=(--budget "$GPU_CHECK_BUDGET"); fi
dryarg=()
if [ "$dry" = 1 ]; then dryarg=(--dry-run); fi
args=()
for arg in "$@"; do
    if [ "$arg" != "--dry-run" ]; then args+=("$arg"); fi
done
exec "$PY" benchmarks/gpu_check.py --install-s "$install_s" "${dryarg[@]}" "${budget[@]}" \
    "${args[@]}"
