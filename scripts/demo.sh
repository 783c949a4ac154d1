#!/usr/bin/env bash
# demo.sh - the README's first command: install what is missing, build, and generate text.
#   bash scripts/demo.sh [MODEL.gguf] [PROMPT]
# Default model: TinyStories stories260K, bundled in models/ (see models/README.md); its GGUF
# says context 128 (a converter default) but it was trained at 512, so the demo asks for 512.
# FORGE_DEMO_BIN=path/to/forge skips the build and runs that binary (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
forge=${FORGE_DEMO_BIN:-}
if [ -z "$forge" ]; then
    make -j"$(nproc)" build/forge >/dev/null
    forge=build/forge
fi
model=${1:-models/stories260K.gguf}
prompt=${2:-Once upon a time}
if [ ! -f "$model" ]; then
    echo "demo: no model at $model; pass a GGUF file: bash scripts/demo.sh MODEL.gguf \"PROMPT\"" >&2
    exit 1
fi
printf '%s' "$prompt"
"$forge" run -m "$model" -p "$prompt" -n 200 -c 512 --seed 42
echo
