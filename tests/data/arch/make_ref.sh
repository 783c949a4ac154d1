#!/bin/bash
# make_ref.sh SHAPE [NAME] - write tests/data/arch/NAME/{ref.json,ref_logits.f32} (NAME defaults
# to SHAPE): `forge synth --shape SHAPE --type F32 --seed 0`, then llama.cpp's logits of every
# position of the fixed prompt below and its 16 greedy ids, by llama_logits.cpp (built against a
# llama.cpp checkout, see README.md) named by $LLAMA_LOGITS. Run from the repository root.
# PATCH_NAME=1: run llama.cpp on a copy whose general.name has "phi" changed to "xxx" (llama.cpp
# c392e50 expects Phi-3's special tokens in any model whose name mentions phi3).
set -euo pipefail
shape=$1 name=${2:-$1}
: "${LLAMA_LOGITS:?LLAMA_LOGITS must name the llama_logits binary}"
FORGE=${FORGE:-build/forge}
IDS=(1 5 9 100 200 300 17 42 77 300 301 302 4 5 6 7 8 9 10 11 12 13 14 15)
out=tests/data/arch/$name
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$FORGE" synth --shape "$shape" --type F32 --seed 0 -o "$tmp/m.gguf" >/dev/null
if [[ ${PATCH_NAME:-0} == 1 ]]; then
    python3 -c "import sys; p=sys.argv[1]; b=open(p,'rb').read(); open(p,'wb').write(b.replace(b'forge-synth tiny-phi', b'forge-synth tiny-xxx'))" "$tmp/m.gguf"
fi
json=$("$LLAMA_LOGITS" -m "$tmp/m.gguf" -o "$tmp/ref_logits.f32" -n 16 "${IDS[@]}")
mkdir -p "$out"
python3 - "$json" "$shape" "$out" "${IDS[@]}" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); shape, out = sys.argv[2], sys.argv[3]
ids = [int(x) for x in sys.argv[4:]]
ref = {"shape": shape, "type": "F32", "seed": 0, "ids": ids, "greedy": r["greedy"],
       "n_vocab": r["n_vocab"],
       "source": "llama.cpp c392e5094 (2025-02-20), CPU, F32 weights, F32 KV cache, "
                 "tests/data/arch/llama_logits.cpp"}
open(out + "/ref.json", "w").write(json.dumps(ref, indent=1) + "\n")
PY
mv "$tmp/ref_logits.f32" "$out/ref_logits.f32"
echo "wrote $out"
