#!/usr/bin/env bash
# The wheels gaugefix needs on the GPU machine and its image lacks (python 3.12, x86-64, no
# network there): lapx, blake3, gguf, pydantic and what pydantic needs (pydantic-core,
# annotated-types, typing-inspection, and typing-extensions ≥ 4.16, newer than some images
# carry). Everything else gaugefix imports is in that image (torch, transformers, safetensors,
# huggingface-hub, numpy, scipy, typer, rich, tqdm, matplotlib, pyyaml, requests, accelerate).
# Downloads them into .whl/ at the repository root, ignores that folder through
# .git/info/exclude, and prints the total size (the carried tree is limited to 64 MiB).
# Then: tool `run` with carry [".whl"] (see benchmarks/gpu_check.sh).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
    lapx==0.11.1
    blake3==1.0.11
    gguf==0.19.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)

exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

ls -l .whl
echo "total: $(du -cb .whl/*.whl | tail -n 1 | cut -f 1) bytes in $(ls .whl/*.whl | wc -l) wheels"
