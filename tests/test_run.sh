#!/usr/bin/env bash
# test_run.sh - `forge run`, `forge eval` and `forge bench` from the command line: greedy ids and
# text of the llama.cpp references (stories260K, F32/F16/Q8_0-mix, F32 KV), -n beyond the
# context, a prompt longer than the context, bad options, eval's logits file, bench's JSON.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
models=$shared/testdata/models
tsv=$shared/testdata/reference/greedy_summary.tsv
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

tu_require "forge run" "$models/stories260K.gguf" "$tsv"
m=$models/stories260K.gguf

# greedy: every F32-KV reference row of the models whose greedy ids must match exactly
col() { awk -F'\t' -v c="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) k = i; next } { print $k }' "$tsv"; }
n_rows=$(($(wc -l <"$tsv") - 1))
for ((r = 1; r <= n_rows; r++)); do
    file=$(col model_file | sed -n "${r}p")
    kv=$(col kv_cache | sed -n "${r}p")
    case "$file" in *Q4_0*) continue ;; esac
    [ "$kv" = f32 ] || continue
    prompt=$(col prompt_json | sed -n "${r}p" | sed 's/^"//; s/"$//')
    want=$(col generated_token_ids | sed -n "${r}p")
    "$FORGE" run -m "$models/$file" -p "$prompt" -n 64 --temp 0 --kv-type f32 -t 2 --ids >"$tmp/out" 2>"$tmp/err"
    rc=$?
    got=$(sed -n 's/^ids: //p' "$tmp/out")
    if [ $rc -eq 0 ] && [ "$got" = "$want" ]; then tu_ok "greedy $file '$prompt'"
    else tu_fail "greedy $file '$prompt'" "rc=$rc got '$got'"; fi
done

# F16 KV cache on the F32 model: the reference has no near-tie, so the ids must match too
for ((r = 1; r <= n_rows; r++)); do
    [ "$(col model_file | sed -n "${r}p")" = stories260K.gguf ] || continue
    [ "$(col kv_cache | sed -n "${r}p")" = f16 ] || continue
    prompt=$(col prompt_json | sed -n "${r}p" | sed 's/^"//; s/"$//')
    want=$(col generated_token_ids | sed -n "${r}p")
    got=$("$FORGE" run -m "$m" -p "$prompt" -n 64 --temp 0 --kv-type f16 -t 1 --ids 2>/dev/null | sed -n 's/^ids: //p')
    if [ "$got" = "$want" ]; then tu_ok "greedy KV f16 '$prompt'"; else tu_fail "greedy KV f16 '$prompt'" "got '$got'"; fi
done

# Q8_0 KV cache: refused with the reason on a model whose heads are not whole 32-value blocks;
# runs on one whose are (tiny-qwen3: head_dim 32), close enough to F32 that greedy ids agree
"$FORGE" run -m "$m" -p "Once upon a time" -n 4 --kv-type q8_0 -t 1 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "KV q8_0 on head_dim 8: exit 1" [ $rc -eq 1 ]
tu_check "KV q8_0 on head_dim 8: names head_dim" grep -q "head_dim is 8" "$tmp/err"
"$FORGE" synth --shape tiny-qwen3 --type F32 -o "$tmp/tq3.gguf" >/dev/null 2>&1
for kv in f32 q8_0; do
    "$FORGE" run -m "$tmp/tq3.gguf" -p "hello world" -n 16 --temp 0 --kv-type $kv -t 2 --ids 2>"$tmp/err.$kv" | sed -n 's/^ids: //p' >"$tmp/ids.$kv"
done
tu_check "KV q8_0 runs (16 ids, KV q8_0 said)" bash -c "[ \$(wc -w <'$tmp/ids.q8_0') -eq 16 ] && grep -q 'KV q8_0' '$tmp/err.q8_0'"
tu_check "KV q8_0 greedy ids equal f32's" cmp -s "$tmp/ids.f32" "$tmp/ids.q8_0"

# the streamed text is the reference text (first prompt, F32)
"$FORGE" run -m "$m" -p "Once upon a time" -n 64 --temp 0 -t 1 >"$tmp/out" 2>"$tmp/err"
tu_check "text streamed" grep -q "^, there was a little girl named Lily. She loved to play outside in the park." "$tmp/out"
tu_check "stats on stderr" grep -q "prompt 5 tokens.*generated 64 tokens" "$tmp/err"

# -n beyond the context: stops at the context (128 - 5 prompt + 1 = 124 tokens) with a message
"$FORGE" run -m "$m" -p "Once upon a time" -n 500 --temp 0 -t 1 --ids >"$tmp/out" 2>"$tmp/err"
rc=$?
n=$(sed -n 's/^ids: //p' "$tmp/out" | wc -w)
tu_check "-n beyond context exits 0" [ $rc -eq 0 ]
tu_check "-n beyond context: 124 tokens" [ "$n" -eq 124 ]
tu_check "-n beyond context: message" grep -q "beyond the context" "$tmp/err"
tu_check "-c 16 limits the context" bash -c "'$FORGE' run -m '$m' -p 'Once upon a time' -c 16 --temp 0 -t 1 --ids 2>/dev/null | sed -n 's/^ids: //p' | wc -w | grep -qx 12"

# a prompt longer than the context
long=$(for i in $(seq 40); do printf 'Once upon a time '; done)
"$FORGE" run -m "$m" -p "$long" -n 4 -t 1 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "long prompt exits 1" [ $rc -eq 1 ]
tu_check "long prompt message" grep -q "longer than the context (128 tokens)" "$tmp/err"

# sampling with a seed is reproducible
"$FORGE" run -m "$m" -p "The little dog" -n 40 --seed 7 --temp 1 -t 1 --ids >"$tmp/a" 2>/dev/null
"$FORGE" run -m "$m" -p "The little dog" -n 40 --seed 7 --temp 1 -t 1 --ids >"$tmp/b" 2>/dev/null
tu_check "same seed, same text" cmp -s "$tmp/a" "$tmp/b"

# bad options
"$FORGE" eval --tokens "1 2" --logits "$tmp/l.f32" >/dev/null 2>"$tmp/err" # run without -m: the demo model
tu_check "no -m: exit 2" [ $? -eq 2 ]
"$FORGE" run -m "$m" -p "x" --temp abc >/dev/null 2>"$tmp/err"
tu_check "bad --temp: exit 2" [ $? -eq 2 ]
"$FORGE" run -m "$tmp/nonexistent.gguf" -p "x" >/dev/null 2>"$tmp/err"
tu_check "missing model: exit 1, named" bash -c "[ $? -eq 1 ] && grep -q nonexistent.gguf '$tmp/err'"

# eval: [n_tokens x n_vocab] float32
"$FORGE" eval -m "$m" --tokens "1 403 407 261 378" --logits "$tmp/l.f32" -t 1 2>/dev/null
tu_check "eval writes 5 x 512 floats" [ "$(stat -c %s "$tmp/l.f32")" -eq $((5 * 512 * 4)) ]
"$FORGE" eval -m "$m" --tokens "1 403 99999" --logits "$tmp/l2.f32" -t 1 2>"$tmp/err"
tu_check "eval: id outside the vocabulary" bash -c "[ $? -eq 1 ] && grep -q 99999 '$tmp/err'"

# bench: table and JSON
"$FORGE" bench -m "$m" -p 16 -n 8 -r 2 -t 1 >"$tmp/out" 2>&1
tu_check "bench table" bash -c "grep -q 'pp16' '$tmp/out' && grep -q 'tg8' '$tmp/out' && grep -q 'GB/s' '$tmp/out'"
"$FORGE" bench -m "$m" -p 16 -n 8 -r 2 -t 1 --json >"$tmp/out.json" 2>/dev/null
tu_check "bench json" bash -c "grep -q '\"test\": \"pp16\"' '$tmp/out.json' && grep -q '\"avg_ts\"' '$tmp/out.json' && grep -q '\"gb_per_s\"' '$tmp/out.json'"
if command -v python3 >/dev/null; then
    tu_check "bench json parses" python3 -c "import json,sys; d=json.load(open('$tmp/out.json')); assert len(d)==2 and all(x['avg_ts']>0 for x in d)"
fi
# bench -d: each test again after D tokens in the cache (a run truncates back to D, which fails
# unless the cache was filled); the context must hold D + the longer test
"$FORGE" bench -m "$m" -p 16 -n 8 -r 1 -t 1 -d 0,40 >"$tmp/out" 2>&1
tu_check "bench -d table" bash -c "grep -q '| *pp16 |' '$tmp/out' && grep -q 'pp16 @ d40' '$tmp/out' && grep -q 'tg8 @ d40' '$tmp/out'"
"$FORGE" bench -m "$m" -p 16 -n 8 -r 1 -t 1 -d 40,0 --json >"$tmp/out.json" 2>/dev/null
if command -v python3 >/dev/null; then
    tu_check "bench -d json" python3 -c "import json; d=json.load(open('$tmp/out.json')); assert [(x['test'], x['n_depth']) for x in d] == [('pp16', 40), ('tg8', 40), ('pp16', 0), ('tg8', 0)] and all(x['avg_ts'] > 0 for x in d), d"
fi
"$FORGE" bench -m "$m" -p 16 -n 8 -r 1 -t 1 -d 100 -c 64 >"$tmp/out" 2>&1
tu_check "bench -d beyond the context" bash -c "[ $? -eq 1 ] && grep -q '116 positions, the context has 64' '$tmp/out'"
"$FORGE" bench -m "$m" -p 16 -n 8 -d 8 --parallel 2 >"$tmp/out" 2>&1
tu_check "bench -d with --parallel is a usage error" bash -c "[ $? -eq 2 ] && grep -q -- '-d does not apply to --parallel' '$tmp/out'"
tu_done
