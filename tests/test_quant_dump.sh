#!/usr/bin/env bash
# test_quant_dump.sh - `forge inspect FILE --tensor NAME --dump OUT.f32` for every weight type of
# ../shared/testdata/quant/ (issue 13): the dumped float32 values start with the reference rows
# (gguf-py / llama.cpp dequantization, bit-identical) and the whole tensor hashes to the
# manifest's dequant_f32_sha256.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
dir=$shared/testdata/quant
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

types="F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS TQ1_0 TQ2_0"
tu_require "quant references" "$dir/README.txt" "$dir/synth-Q4_K.gguf" "$dir/synth-Q4_K.json"

# the manifest's sha256 of the whole dequantized tensor
want_sha() {
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
print([t["dequant_f32_sha256"] for t in d["tensors"] if t["name"]==sys.argv[2]][0])' "$1" "$2"
}

for t in $types; do
    f=$dir/synth-$t.gguf
    for spec in "blk.0.attn_q.weight:rows0-7:8192" "blk.0.ffn_down.weight:rows0-3:12288"; do
        name=${spec%%:*} rest=${spec#*:} rows=${rest%%:*} bytes=${rest#*:}
        out=$tmp/$t.$name.f32
        "$FORGE" inspect "$f" --tensor "$name" --dump "$out" >"$tmp/out.txt" 2>"$tmp/err.txt"
        tu_check "$t $name: --dump exits 0" [ $? -eq 0 ]
        tu_check "$t $name: first rows equal the reference $rows" \
            cmp -s -n "$bytes" "$out" "$dir/synth-$t.$name.$rows.f32"
        got=$(sha256sum <"$out" | cut -d' ' -f1)
        tu_check "$t $name: whole tensor sha256 equals the manifest" [ "$got" = "$(want_sha "$dir/synth-$t.json" "$name")" ]
    done
done

# the tied embedding in a K-quant and in a ternary type, dumped whole
for t in Q6_K TQ1_0; do
    out=$tmp/$t.embd.f32
    "$FORGE" inspect "$dir/synth-$t.gguf" --tensor token_embd.weight --dump "$out" >/dev/null 2>&1
    got=$(sha256sum <"$out" | cut -d' ' -f1)
    tu_check "$t token_embd.weight: sha256 equals the manifest" [ "$got" = "$(want_sha "$dir/synth-$t.json" token_embd.weight)" ]
done
tu_done
