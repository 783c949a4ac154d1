#!/usr/bin/env bash
# test_synth.sh - `forge synth`: the `tiny` shapes in every type read back through `forge inspect`
# with the right shapes, types and keys; a seed gives identical bytes; --vocab-from copies the
# tokenizer; values have the documented distribution; bad arguments fail cleanly.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

declare -A ftype=([F32]=0 [F16]=1 [BF16]=32 [Q8_0]=7 [Q4_0]=2)
for t in F32 F16 BF16 Q8_0 Q4_0; do
    f=$tmp/tiny-$t.gguf
    "$FORGE" synth --shape tiny --type "$t" -o "$f" 2>"$tmp/err.txt"
    tu_check "tiny $t: exit 0" [ $? -eq 0 ]
    "$FORGE" inspect "$f" >"$tmp/i.txt" 2>&1
    tu_check "tiny $t: inspect ok" [ $? -eq 0 ]
    tu_check "tiny $t: 21 tensors" grep -q " 21 tensors$" "$tmp/i.txt"
    tu_check "tiny $t: file_type" grep -Eq "^  general\.file_type +u32 +${ftype[$t]}$" "$tmp/i.txt"
    tu_check "tiny $t: keys" bash -c "grep -Eq '^  llama\.embedding_length +u32 +64$' '$tmp/i.txt' &&
        grep -Eq '^  llama\.feed_forward_length +u32 +192$' '$tmp/i.txt' &&
        grep -Eq '^  llama\.block_count +u32 +2$' '$tmp/i.txt' &&
        grep -Eq '^  llama\.attention\.head_count +u32 +4$' '$tmp/i.txt' &&
        grep -Eq '^  llama\.attention\.head_count_kv +u32 +2$' '$tmp/i.txt' &&
        grep -Eq '^  llama\.vocab_size +u32 +512$' '$tmp/i.txt' &&
        grep -Eq '^  tokenizer\.ggml\.tokens +arr\[str\] +\[512 items: \"<unk>\", \"<s>\", \"</s>\", \"<0x00>\"' '$tmp/i.txt'"
    tu_check "tiny $t: 2-D weights are $t" bash -c "grep -Eq '^  token_embd\.weight +$t +\[64, 512\] ' '$tmp/i.txt' &&
        grep -Eq '^  output\.weight +$t +\[64, 512\] ' '$tmp/i.txt' &&
        grep -Eq '^  blk\.1\.attn_k\.weight +$t +\[64, 32\] ' '$tmp/i.txt' &&
        grep -Eq '^  blk\.1\.attn_output\.weight +$t +\[64, 64\] ' '$tmp/i.txt' &&
        grep -Eq '^  blk\.0\.ffn_down\.weight +$t +\[192, 64\] ' '$tmp/i.txt' &&
        [ \$(grep -v _norm '$tmp/i.txt' | grep -Ec '^  blk\.[01]\.[a-z_]+\.weight +$t ') -eq 14 ]"
    tu_check "tiny $t: norms F32" [ "$(grep -Ec '^  (output_norm|blk\.[01]\.(attn|ffn)_norm)\.weight +F32 +\[64\] ' "$tmp/i.txt")" -eq 5 ]
    "$FORGE" inspect "$f" --tensor blk.1.ffn_down.weight --dump "$tmp/w-$t.f32"
    tu_check "tiny $t: dequantizes" [ $? -eq 0 ]
    "$FORGE" inspect "$f" --tensor blk.0.attn_norm.weight --dump "$tmp/n-$t.f32"
done

# reproducibility
"$FORGE" synth --shape tiny --type Q4_0 -o "$tmp/again.gguf" 2>/dev/null
tu_check "same seed: identical bytes" cmp -s "$tmp/tiny-Q4_0.gguf" "$tmp/again.gguf"
"$FORGE" synth --shape tiny --type Q4_0 --seed 7 -o "$tmp/s7.gguf" 2>/dev/null
tu_check "another seed: other bytes" bash -c "! cmp -s '$tmp/tiny-Q4_0.gguf' '$tmp/s7.gguf'"
"$FORGE" synth --shape tiny --type Q4_0 --seed 7 -o "$tmp/s7b.gguf" 2>/dev/null
tu_check "seed 7 twice: identical bytes" cmp -s "$tmp/s7.gguf" "$tmp/s7b.gguf"

# value distribution (F32), and quantized types close to F32 (same seed, same values)
if command -v python3 >/dev/null; then
    tu_check "weights ~N(0, 0.02), norms ~1, no zeros; types agree" python3 - "$tmp" <<'EOF'
import struct, sys
d = sys.argv[1]
def rd(name):
    b = open(f"{d}/{name}", "rb").read()
    return struct.unpack(f"<{len(b)//4}f", b)
w = rd("w-F32.f32"); n = len(w)
mean = sum(w) / n; sd = (sum((x - mean) ** 2 for x in w) / n) ** 0.5
assert n == 192 * 64, n
assert abs(mean) < 0.002 and 0.018 < sd < 0.022, (mean, sd)
assert all(x != 0 for x in w)
norm = rd("n-F32.f32")
assert all(0.85 < x < 1.15 for x in norm), norm
for t, lim in (("F16", 1e-6), ("BF16", 1e-4), ("Q8_0", 1e-4), ("Q4_0", 2e-2)):
    q = rd(f"w-{t}.f32")
    nmse = sum((a - b) ** 2 for a, b in zip(w, q)) / sum(a * a for a in w)
    assert nmse < lim, (t, nmse)
    assert rd(f"n-{t}.f32") == norm, t
EOF
else
    tu_skip "value distribution" "python3 not found"
fi

# qwen2 / qwen3 layouts (small shapes of the same architectures)
"$FORGE" synth --shape tiny-qwen2 --type F16 -o "$tmp/q2.gguf" 2>/dev/null && "$FORGE" inspect "$tmp/q2.gguf" >"$tmp/q2.txt"
tu_check "tiny-qwen2: arch and biases" bash -c "grep -Eq '^  general\.architecture +str +\"qwen2\"$' '$tmp/q2.txt' &&
    grep -Eq '^  qwen2\.attention\.layer_norm_rms_epsilon +f32 +9\.99999997e-07$' '$tmp/q2.txt' &&
    grep -Eq '^  blk\.1\.attn_q\.bias +F32 +\[64\] ' '$tmp/q2.txt' &&
    grep -Eq '^  blk\.1\.attn_v\.bias +F32 +\[32\] ' '$tmp/q2.txt' &&
    ! grep -q '^  output\.weight ' '$tmp/q2.txt'"
"$FORGE" synth --shape tiny-qwen3 --type Q8_0 -o "$tmp/q3.gguf" 2>/dev/null && "$FORGE" inspect "$tmp/q3.gguf" >"$tmp/q3.txt"
tu_check "tiny-qwen3: head_dim 32, q/k norms" bash -c "grep -Eq '^  qwen3\.attention\.key_length +u32 +32$' '$tmp/q3.txt' &&
    grep -Eq '^  blk\.0\.attn_q\.weight +Q8_0 +\[64, 128\] ' '$tmp/q3.txt' &&
    grep -Eq '^  blk\.0\.attn_k\.weight +Q8_0 +\[64, 64\] ' '$tmp/q3.txt' &&
    grep -Eq '^  blk\.0\.attn_output\.weight +Q8_0 +\[128, 64\] ' '$tmp/q3.txt' &&
    grep -Eq '^  blk\.0\.attn_q_norm\.weight +F32 +\[32\] ' '$tmp/q3.txt' &&
    grep -Eq '^  blk\.0\.attn_k_norm\.weight +F32 +\[32\] ' '$tmp/q3.txt'"

# --vocab-from
spm=$shared/testdata/vocab/ggml-vocab-llama-spm.gguf
if [ -f "$spm" ]; then
    "$FORGE" synth --shape tiny --type Q8_0 --vocab-from "$spm" -o "$tmp/v.gguf" 2>/dev/null
    tu_check "--vocab-from: exit 0" [ $? -eq 0 ]
    "$FORGE" inspect "$tmp/v.gguf" >"$tmp/v.txt"
    "$FORGE" inspect "$spm" >"$tmp/spm.txt"
    tu_check "--vocab-from: vocab 32000" bash -c "grep -Eq '^  llama\.vocab_size +u32 +32000$' '$tmp/v.txt' &&
        grep -Eq '^  token_embd\.weight +Q8_0 +\[64, 32000\] ' '$tmp/v.txt'"
    tu_check "--vocab-from: every tokenizer.* line copied" \
        diff <(grep -E '^  tokenizer\.' "$tmp/spm.txt" | sed 's/  */ /g' | sort) \
             <(grep -E '^  tokenizer\.' "$tmp/v.txt" | sed 's/  */ /g' | sort)
    "$FORGE" synth --shape llama3-8b --type Q4_0 --vocab-from "$spm" -o "$tmp/big.gguf" 2>"$tmp/err.txt"
    tu_check "vocab size mismatch: exit 1" [ $? -eq 1 ]
    tu_check "vocab size mismatch: message" grep -q "has 32000 tokens but shape 'llama3-8b' needs 128256" "$tmp/err.txt"
    tu_check "vocab size mismatch: no file" [ ! -e "$tmp/big.gguf" ]
else
    tu_skip "--vocab-from" "$spm is absent"
fi

# errors
"$FORGE" synth --shape tiny --type Q2_K -o "$tmp/x.gguf" 2>"$tmp/err.txt"
tu_check "unsupported type: bad usage (exit 2), like an unknown shape" [ $? -eq 2 ]
tu_check "unsupported type: message" grep -q "bad value for --type: 'Q2_K' (expected F32, F16, BF16, Q8_0 or Q4_0)" "$tmp/err.txt"
"$FORGE" synth --shape nope --type F32 -o "$tmp/x.gguf" 2>/dev/null
tu_check "unknown shape: exit 2" [ $? -eq 2 ]
"$FORGE" synth --shape tiny --type F32 2>/dev/null
tu_check "missing -o: exit 2" [ $? -eq 2 ]
"$FORGE" synth --shape tiny --type F32 -o /nonexistent-dir/x.gguf 2>"$tmp/err.txt"
tu_check "unwritable output: exit 1" [ $? -eq 1 ]
tu_check "unwritable output: names the path" grep -q '/nonexistent-dir/x.gguf' "$tmp/err.txt"
"$FORGE" synth --help >"$tmp/h.txt"
tu_check "--help lists the shapes and the vocab choice" bash -c "grep -q 'llama3.2-1b' '$tmp/h.txt' && grep -q 'qwen3-0.6b' '$tmp/h.txt' && grep -q 'byte tokens' '$tmp/h.txt'"

tu_done
