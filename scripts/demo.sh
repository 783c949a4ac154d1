#!/usr/bin/env bash
# demo.sh - the README's first command: install what is missing, build, and generate text.
#   bash scripts/demo.sh [MODEL.gguf] [PROMPT]
# Default model: TinyStories stories260K from ../shared (present on Forge dev and CI machines); its
# GGUF says context 128 (a converter default) but it was trained at 512, so the demo asks for 512.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
make -j"$(nproc)" build/forge >/dev/null
model=${1:-../shared/testdata/models/stories260K.gguf}
prompt=${2:-Once upon a time}
if [ ! -f "$model" ]; then
    echo "demo: no model at $model; pass a GGUF file: bash scripts/demo.sh MODEL.gguf \"PROMPT\"" >&2
    exit 1
fi
printf '%s' "$prompt"
build/forge run -m "$model" -p "$prompt" -n 200 -c 512 --seed 42
echo
