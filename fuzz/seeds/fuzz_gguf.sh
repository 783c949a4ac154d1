#!/usr/bin/env bash
# fuzz_gguf.sh CORPUS_DIR - seed the GGUF fuzzer with the small real .gguf files from the shared
# test data ($FORGE_SHARED or ../shared), when present. Large files are skipped (libFuzzer inputs
# stay small); the fuzzer's own mutations find the rest.
set -u
dir=${1:?usage: fuzz_gguf.sh CORPUS_DIR}
shared=${FORGE_SHARED:-$(cd "$(dirname "$0")/../../.." && pwd)/shared}
n=0
[ -d "$shared" ] || shared=/nonexistent
for f in "$shared"/testdata/models/*.gguf "$shared"/testdata/quant/*.gguf "$shared"/testdata/vocab/*.gguf \
         "$shared"/hf-ref/*/model.gguf; do
    [ -f "$f" ] || continue
    # the first 16 KiB (header, metadata, tensor table: invalid, but they steer the fuzzer to the
    # parser), and small files whole
    head -c 16384 "$f" >"$dir/seed-$n-head.gguf"; n=$((n + 1))
    [ "$(stat -c %s "$f")" -le 400000 ] || continue
    cp "$f" "$dir/seed-$n.gguf"; n=$((n + 1))
done
# small valid files with every tensor type forge synth writes (when a forge binary is built)
forge=${FORGE:-$(cd "$(dirname "$0")/../.." && pwd)/build/forge}
if [ -x "$forge" ]; then
    for t in F32 F16 BF16 Q8_0 Q4_0; do
        "$forge" synth --shape tiny-qwen3 --type $t -o "$dir/synth-$t.gguf" 2>/dev/null && n=$((n + 1))
    done
fi
echo "fuzz_gguf: $n seed files"
