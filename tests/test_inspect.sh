#!/usr/bin/env bash
# test_inspect.sh - `forge inspect`: output agrees with testdata/README.txt facts for stories260K,
# --json is one valid document with the same facts, --dump writes the exact float32 weights, and
# corrupted files fail with exit status 1 and one clear stderr line naming the file.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
model=$shared/testdata/models/stories260K.gguf
bin=$shared/testdata/models/stories260K.bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

tu_require "inspect stories260K" "$model" "$bin"

"$FORGE" inspect "$model" >"$tmp/out.txt" 2>"$tmp/err.txt"
tu_check "inspect exits 0" [ $? -eq 0 ]
tu_check "no stderr on success" [ ! -s "$tmp/err.txt" ]
tu_check "header: version, alignment, data offset" grep -q "GGUF version 3, 1185376 bytes, alignment 32, tensor data at offset 14176" "$tmp/out.txt"
tu_check "19 keys, 48 tensors" grep -q "^19 metadata keys, 48 tensors$" "$tmp/out.txt"
tu_check "llama.embedding_length u32 64" grep -Eq "^  llama\.embedding_length +u32 +64$" "$tmp/out.txt"
tu_check "llama.feed_forward_length 172" grep -Eq "^  llama\.feed_forward_length +u32 +172$" "$tmp/out.txt"
tu_check "general.architecture quoted" grep -Eq "^  general\.architecture +str +\"llama\"$" "$tmp/out.txt"
tu_check "tokens abbreviated with length" grep -Eq "^  tokenizer\.ggml\.tokens +arr\[str\] +\[512 items: \"<unk>\", \"<s>\", \"</s>\"" "$tmp/out.txt"
tu_check "token_embd [64, 512]" grep -Eq "^  token_embd\.weight +F32 +\[64, 512\] +0 +131072$" "$tmp/out.txt"
tu_check "ffn_down [172, 64]" grep -Eq "^  blk\.4\.ffn_down\.weight +F32 +\[172, 64\] " "$tmp/out.txt"
tu_check "48 tensor lines" [ "$(grep -Ec '^  (token_embd|output|blk\.[0-9]+\.[a-z_]+)(_norm)?\.weight ' "$tmp/out.txt")" -eq 48 ]
# 260K parameters: 2*512*64 + 64 + 5*(4*64*64 ... ) = 292800 per the tensor shapes in the README
tu_check "totals" grep -Eq "^  F32 +48 tensors +292800 parameters +1171200 bytes$" "$tmp/out.txt"

"$FORGE" inspect "$model" --json >"$tmp/out.json"
tu_check "--json exits 0" [ $? -eq 0 ]
tu_check "--json tensor_count 48" grep -Pq '^\t"tensor_count":\t48,$' "$tmp/out.json"
tu_check "--json data_offset 14176" grep -Pq '^\t"data_offset":\t14176,$' "$tmp/out.json"
tu_check "--json embedding_length 64" grep -Pzq '"key":\t"llama.embedding_length",\s*"type":\t"u32",\s*"value":\t64\s*}' "$tmp/out.json"
tu_check "--json tokens length 512, abbreviated" grep -Pzq '"key":\t"tokenizer.ggml.tokens",\s*"type":\t"arr",\s*"elem_type":\t"str",\s*"length":\t512,\s*"truncated":\ttrue' "$tmp/out.json"
if command -v python3 >/dev/null; then
    tu_check "--json parses" python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert len(d['tensors'])==48 and d['tensors'][0]['shape']==[64,512]" "$tmp/out.json"
fi

"$FORGE" inspect "$model" --tensor token_embd.weight --dump "$tmp/te.f32"
tu_check "--dump exits 0" [ $? -eq 0 ]
tail -c +29 "$bin" | head -c $((512 * 64 * 4)) >"$tmp/ref.f32"
tu_check "--dump equals stories260K.bin token_embedding" cmp -s "$tmp/te.f32" "$tmp/ref.f32"
"$FORGE" inspect "$model" --tensor blk.0.ffn_down.weight >"$tmp/one.txt"
tu_check "--tensor prints one entry" grep -Eq "^  blk\.0\.ffn_down\.weight F32 +\[172, 64\]" "$tmp/one.txt"

"$FORGE" inspect "$model" --tensor no.such.tensor --dump "$tmp/x.f32" 2>"$tmp/err.txt"
tu_check "unknown tensor: exit 1" [ $? -eq 1 ]
tu_check "unknown tensor: message" grep -q "no tensor named 'no.such.tensor'" "$tmp/err.txt"
tu_check "unknown tensor: no file" [ ! -e "$tmp/x.f32" ]
q2k=$shared/testdata/quant/synth-Q2_K.gguf
if [ -f "$q2k" ]; then
    "$FORGE" inspect "$q2k" --tensor blk.0.attn_q.weight --dump "$tmp/q.f32" 2>"$tmp/err.txt"
    rc=$?
    if [ $rc -eq 0 ]; then
        # Q2_K dequantization landed: then the dump must match the gguf-py reference rows 0..7
        tu_check "Q2_K dump matches reference" cmp -s <(head -c 8192 "$tmp/q.f32") "$shared/testdata/quant/synth-Q2_K.blk.0.attn_q.weight.rows0-7.f32"
    else
        tu_check "unsupported type: exit 1" [ $rc -eq 1 ]
        tu_check "unsupported type: names the type" grep -q "Q2_K" "$tmp/err.txt"
        tu_check "unsupported type: no file" [ ! -e "$tmp/q.f32" ]
    fi
fi

"$FORGE" inspect --help >"$tmp/help.txt"
tu_check "--help exits 0" [ $? -eq 0 ]
tu_check "--help mentions --dump" grep -q -- "--dump" "$tmp/help.txt"
"$FORGE" inspect 2>/dev/null
tu_check "no FILE: exit 2" [ $? -eq 2 ]
"$FORGE" inspect "$model" --bogus 2>/dev/null
tu_check "unknown option: exit 2" [ $? -eq 2 ]

# corrupted copies: exit 1, exactly one stderr line naming the file (and the offset)
corrupt() { # NAME OFFSET BYTES(printf format)
    cp "$model" "$tmp/$1.gguf"
    printf "$3" | dd of="$tmp/$1.gguf" bs=1 seek="$2" conv=notrunc status=none
}
corrupt bad-magic 0 'XGUF'
corrupt version1 4 '\001\000\000\000'
corrupt tensor-count 8 '\000\000\000\000\000\001\000\000'
corrupt first-key-len 24 '\377\377\377\377\000\000\000\000'
head -c 5000 "$model" >"$tmp/truncated.gguf"
head -c 600000 "$model" >"$tmp/truncated-data.gguf"
for f in bad-magic version1 tensor-count first-key-len truncated truncated-data; do
    "$FORGE" inspect "$tmp/$f.gguf" >"$tmp/out.txt" 2>"$tmp/err.txt"
    rc=$?
    tu_check "$f: exit 1" [ $rc -eq 1 ]
    tu_check "$f: one stderr line naming the file and offset" \
        [ "$(wc -l <"$tmp/err.txt")" -eq 1 -a -n "$(grep -F "$tmp/$f.gguf: offset " "$tmp/err.txt")" ]
    tu_check "$f: nothing on stdout" [ ! -s "$tmp/out.txt" ]
done
grep -q "tensor count 1099511627776 cannot fit" <("$FORGE" inspect "$tmp/tensor-count.gguf" 2>&1)
tu_check "tensor-count: says what is wrong" [ $? -eq 0 ]
"$FORGE" inspect "$tmp/does-not-exist.gguf" 2>"$tmp/err.txt"
tu_check "missing file: exit 1" [ $? -eq 1 ]
tu_check "missing file: message" grep -q "does-not-exist.gguf: cannot open" "$tmp/err.txt"

tu_done
