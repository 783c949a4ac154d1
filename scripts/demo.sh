#!/usr/bin/env bash
# demo.sh - the README's first command: install what is missing, build, and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
make -j"$(nproc)" build/forge
model=${1:-../shared/testdata/models/stories260K.gguf}
if [ ! -f "$model" ]; then
    echo "demo: no model at $model; pass a GGUF file: bash scripts/demo.sh MODEL.gguf" >&2
    exit 1
fi
exec build/forge inspect "$model"
