#!/usr/bin/env bash
# test_quantize.sh - `forge quantize` against llama-quantize (../shared/testdata/quant/quantize/):
# for every TYPE, pure and default, the same tensor types and the same data bytes (sha256 per
# tensor) as llama.cpp c392e50 writes from synth-F16.gguf; general.file_type and
# quantization_version as llama.cpp sets them; -t gives the same bytes; quantized input only with
# --allow-requantize (tensors already in the target type are copied); never onto the input; OUT
# kept without --force; a write failure leaves no file; unknown TYPE is a usage error.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
qdir=$shared/testdata/quant
ref=$qdir/quantize/quantize_ref.json
in=$qdir/synth-F16.gguf
tu_require "quantize" "$ref" "$in" "$qdir/synth-Q4_0.gguf"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# tensor_hashes FILE: "name type sha256" per tensor, sorted by name
tensor_hashes() {
    local f=$1 json base name type off n
    json=$("$FORGE" inspect --json "$f") || return 1
    base=$(jq -r .data_offset <<<"$json")
    jq -r '.tensors[] | "\(.name) \(.type) \(.offset) \(.n_bytes)"' <<<"$json" |
    while read -r name type off n; do
        printf '%s %s %s\n' "$name" "$type" \
            "$(dd if="$f" bs=64K iflag=skip_bytes,count_bytes skip=$((base + off)) count="$n" 2>/dev/null |
               sha256sum | cut -d' ' -f1)"
    done | sort
}
file_type_of() { "$FORGE" inspect --json "$1" | jq -r '.metadata[] | select(.key == "general.file_type") | .value'; }
qver_of() { "$FORGE" inspect --json "$1" | jq -r '.metadata[] | select(.key == "general.quantization_version") | .value'; }

declare -A ftype=([Q4_0]=2 [Q4_1]=3 [Q5_0]=8 [Q5_1]=9 [Q8_0]=7 [Q2_K]=10 [Q3_K_S]=11 [Q3_K_M]=12
                  [Q3_K_L]=13 [Q4_K_S]=14 [Q4_K_M]=15 [Q5_K_S]=16 [Q5_K_M]=17 [Q6_K]=18 [IQ4_NL]=25
                  [IQ4_XS]=30)
types=$(jq -r 'keys[]' "$ref")
tu_check "reference lists 16 types" [ "$(echo "$types" | wc -l)" -eq 16 ]

# ---- 1. bit-exact with llama-quantize, every TYPE, pure and default ------------------------
for t in $types; do
    for mode in default pure; do
        out=$tmp/$t-$mode.gguf
        flag=; [ $mode = pure ] && flag=--pure
        "$FORGE" quantize $flag -t 2 "$in" "$out" "$t" 2>"$tmp/err"
        rc=$?
        tu_check "$t $mode: exit 0 (rc $rc)" [ $rc -eq 0 ]
        jq -r --arg t "$t" --arg m $mode '.[$t][$m] | to_entries[] | "\(.key) \(.value[0]) \(.value[1])"' "$ref" |
            sort >"$tmp/want"
        tensor_hashes "$out" >"$tmp/got"
        tu_check "$t $mode: tensor types as llama-quantize" \
            cmp -s <(cut -d' ' -f1,2 "$tmp/want") <(cut -d' ' -f1,2 "$tmp/got")
        if cmp -s "$tmp/want" "$tmp/got"; then
            tu_ok "$t $mode: every tensor's bytes as llama-quantize"
        else
            tu_fail "$t $mode: every tensor's bytes as llama-quantize" \
                "$(diff "$tmp/want" "$tmp/got" | grep '^>' | cut -d' ' -f2,3 | tr '\n' ';')"
        fi
        tu_check "$t $mode: general.file_type ${ftype[$t]}" [ "$(file_type_of "$out")" = "${ftype[$t]}" ]
        tu_check "$t $mode: quantization_version 2" [ "$(qver_of "$out")" = 2 ]
        tu_check "$t $mode: summary names the sizes" grep -Eq "wrote .*: 1\.75 MiB -> [0-9.]+ MiB, 11 tensors \(3 F32" "$tmp/err"
    done
done

# metadata copied (every key of the input, same values; file_type differs)
"$FORGE" inspect --json "$in" | jq -c '[.metadata[] | select(.key != "general.file_type")] | sort_by(.key)' >"$tmp/kin"
"$FORGE" inspect --json "$tmp/Q4_K_M-default.gguf" | jq -c '[.metadata[] | select(.key != "general.file_type")] | sort_by(.key)' >"$tmp/kout"
tu_check "metadata copied" cmp -s "$tmp/kin" "$tmp/kout"

# F32 / F16 / BF16 targets: F16 -> F32 -> F16 gives back the same bytes; file types 0 and 32
"$FORGE" quantize "$in" "$tmp/f32.gguf" F32 2>/dev/null && "$FORGE" quantize "$tmp/f32.gguf" "$tmp/f16.gguf" f16 2>/dev/null
tu_check "F16 -> F32 -> F16: same tensors" cmp -s <(tensor_hashes "$in") <(tensor_hashes "$tmp/f16.gguf")
tu_check "F32: file_type 0" [ "$(file_type_of "$tmp/f32.gguf")" = 0 ]
tu_check "F32: 11 F32 tensors" [ "$(tensor_hashes "$tmp/f32.gguf" | grep -c ' F32 ')" -eq 11 ]
"$FORGE" quantize "$in" "$tmp/bf16.gguf" BF16 2>/dev/null
tu_check "BF16: 8 BF16 weights" [ "$(tensor_hashes "$tmp/bf16.gguf" | grep -c ' BF16 ')" -eq 8 ]
tu_check "BF16: file_type 32" [ "$(file_type_of "$tmp/bf16.gguf")" = 32 ]

# ---- 2. threads do not change the bytes ---------------------------------------------------
"$FORGE" quantize -t 1 "$in" "$tmp/t1.gguf" Q4_K_M 2>/dev/null
"$FORGE" quantize -t 3 "$in" "$tmp/t3.gguf" Q4_K_M 2>/dev/null
tu_check "-t 1 and -t 3 write identical files" cmp -s "$tmp/t1.gguf" "$tmp/t3.gguf"
tu_check "-t 2 writes the same file" cmp -s "$tmp/t1.gguf" "$tmp/Q4_K_M-default.gguf"

# ---- 2b. a progress bar on a terminal only --------------------------------------------------
tu_check "no progress bar when stderr is no terminal" bash -c "! grep -q '%' '$tmp/err'"
if command -v script >/dev/null; then
    script -qec "'$FORGE' quantize -t 2 '$in' '$tmp/tty.gguf' Q6_K" /dev/null >"$tmp/tty.txt" 2>&1
    tu_check "progress bar on a terminal" grep -q "100% 0.7 / 0.7 MiB" "$tmp/tty.txt"
else
    tu_skip "progress bar on a terminal" "no script(1) to make a terminal"
fi

# ---- 3. bad usage ---------------------------------------------------------------------------
"$FORGE" quantize "$in" "$tmp/x.gguf" Q4_K_X 2>"$tmp/err"
rc=$?
tu_check "unknown TYPE: exit 2 (rc $rc)" [ $rc -eq 2 ]
tu_check "unknown TYPE: names it and lists the types" bash -c "grep -q \"unknown TYPE 'Q4_K_X'\" '$tmp/err' && grep -q 'Q4_K_M' '$tmp/err' && grep -q 'IQ4_XS' '$tmp/err'"
tu_check "unknown TYPE: no file" [ ! -e "$tmp/x.gguf" ]
"$FORGE" quantize "$in" "$tmp/x.gguf" 2>/dev/null
tu_check "missing TYPE: exit 2" [ $? -eq 2 ]
"$FORGE" quantize -t 0 "$in" "$tmp/x.gguf" Q8_0 2>/dev/null
tu_check "-t 0: exit 2" [ $? -eq 2 ]

# ---- 4. quantized input ---------------------------------------------------------------------
q40=$qdir/synth-Q4_0.gguf
"$FORGE" quantize "$q40" "$tmp/rq.gguf" Q8_0 2>"$tmp/err"
rc=$?
tu_check "quantized input: exit 1 (rc $rc)" [ $rc -eq 1 ]
tu_check "quantized input: names tensor, type and --allow-requantize" \
    grep -Eq "tensor [a-z_.0-9]+weight is already quantized \(Q4_0\).*--allow-requantize" "$tmp/err"
tu_check "quantized input: no file, no temporary file" [ -z "$(ls -A "$tmp" | grep -E '^\.|rq')" ]
"$FORGE" quantize --allow-requantize "$q40" "$tmp/rq.gguf" Q8_0 2>"$tmp/err"
rc=$?
tu_check "--allow-requantize: exit 0 (rc $rc)" [ $rc -eq 0 ]
tu_check "--allow-requantize: Q8_0 weights" [ "$(tensor_hashes "$tmp/rq.gguf" | grep -c ' Q8_0 ')" -eq 8 ]
# already in the target type: copied as it is, no --allow-requantize needed (as llama-quantize)
"$FORGE" quantize --pure "$q40" "$tmp/same.gguf" Q4_0 2>"$tmp/err"
rc=$?
tu_check "pure Q4_0 of a Q4_0 file: exit 0 (rc $rc)" [ $rc -eq 0 ]
tu_check "pure Q4_0 of a Q4_0 file: tensors copied" cmp -s <(tensor_hashes "$q40") <(tensor_hashes "$tmp/same.gguf")

# ---- 5. never onto the input; OUT kept without --force ---------------------------------------
cp "$in" "$tmp/in.gguf"
ln -s "$tmp/in.gguf" "$tmp/link.gguf"
for target in "$tmp/in.gguf" "$tmp/link.gguf"; do
    "$FORGE" quantize --force "$tmp/in.gguf" "$target" Q8_0 2>"$tmp/err"
    rc=$?
    tu_check "OUT == IN ($(basename "$target")): exit 1 (rc $rc)" [ $rc -eq 1 ]
    tu_check "OUT == IN ($(basename "$target")): input intact" cmp -s "$in" "$tmp/in.gguf"
done
tu_check "OUT == IN: says so" grep -qi "input" "$tmp/err"
echo keep >"$tmp/exists.gguf"
"$FORGE" quantize "$in" "$tmp/exists.gguf" Q8_0 2>"$tmp/err"
rc=$?
tu_check "OUT exists: exit 1 (rc $rc)" [ $rc -eq 1 ]
tu_check "OUT exists: kept, --force suggested" bash -c "[ \"\$(cat '$tmp/exists.gguf')\" = keep ] && grep -q -- --force '$tmp/err'"
"$FORGE" quantize --force "$in" "$tmp/exists.gguf" Q8_0 2>/dev/null
tu_check "OUT exists with --force: replaced" cmp -s <(tensor_hashes "$tmp/exists.gguf") <(tensor_hashes "$tmp/Q8_0-default.gguf")

# ---- 6. a write failure leaves no partial file ------------------------------------------------
mkdir "$tmp/full"
(trap '' XFSZ; ulimit -f 200; exec "$FORGE" quantize "$in" "$tmp/full/o.gguf" Q8_0) 2>"$tmp/err"
rc=$?
tu_check "write failure: exit 1 (rc $rc)" [ $rc -eq 1 ]
tu_check "write failure: names OUT and the reason" grep -q "full/o.gguf.*too large" "$tmp/err"
tu_check "write failure: nothing left" [ -z "$(ls -A "$tmp/full")" ]

# killed by the file-size limit (SIGXFSZ at its default action): the temporary file is removed
# too (it was left behind before); the same for forge synth, which shares the output code
{ (ulimit -f 200; exec "$FORGE" quantize "$in" "$tmp/full/o.gguf" Q8_0); } 2>/dev/null
rc=$?
tu_check "SIGXFSZ: killed by the signal (rc $rc)" [ $rc -gt 128 ]
tu_check "SIGXFSZ: no temporary file left" [ -z "$(ls -A "$tmp/full")" ]
{ (ulimit -f 20; exec "$FORGE" synth --shape tiny --type F32 -o "$tmp/full/s.gguf"); } 2>/dev/null
tu_check "SIGXFSZ, forge synth: no temporary file left" [ -z "$(ls -A "$tmp/full")" ]

# ---- 7. rows the type cannot hold fall back, and the output says so ---------------------------
# stories260K: dim 64, so K-quant rows (256) do not fit
st=$shared/testdata/models/stories260K.gguf
if [ -e "$st" ]; then
    "$FORGE" quantize "$st" "$tmp/st.gguf" Q4_K_M 2>"$tmp/err"
    rc=$?
    tu_check "fallback: exit 0 (rc $rc)" [ $rc -eq 0 ]
    tu_check "fallback: reported per tensor" grep -q "blk.0.attn_q.weight: rows of 64 elements are no multiple of Q4_K's block of 256: using Q5_0" "$tmp/err"
    tu_check "fallback: the output matrix's Q8_0 reported" grep -q "output.weight: rows of 64 elements are no multiple of Q4_K's block of 256: using Q8_0 for the output matrix" "$tmp/err"
    tu_check "fallback: counted in the summary" grep -q "; 37 tensors fell back" "$tmp/err"
    tu_check "fallback: file reads back" "$FORGE" inspect "$tmp/st.gguf" >/dev/null
else
    tu_fail "fallback" "$st is absent"
fi
tu_done
