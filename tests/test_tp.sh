#!/usr/bin/env bash
# test_tp.sh - `--tp N` from the command line: with --device cpu, forge run's greedy ids over 2
# and 4 ranks equal the reference ids of llama.cpp (and so tp 1), bench reports it; the values
# and plans refused, with the exit status and a message naming the option.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
models=$shared/testdata/models
tsv=$shared/testdata/reference/greedy_summary.tsv
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

tu_require "forge --tp" "$models/stories260K.gguf" "$tsv"
m=$models/stories260K.gguf

# the F32-KV references of stories260K (8 heads, 4 KV heads: 2 and 4 ranks divide them; 1 is
# the same path with one rank)
col() { awk -F'\t' -v c="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) k = i; next } { print $k }' "$tsv"; }
n_rows=$(($(wc -l <"$tsv") - 1))
n_checked=0
for ((r = 1; r <= n_rows; r++)); do
    [ "$(col model_file | sed -n "${r}p")" = stories260K.gguf ] || continue
    [ "$(col kv_cache | sed -n "${r}p")" = f32 ] || continue
    prompt=$(col prompt_json | sed -n "${r}p" | sed 's/^"//; s/"$//')
    want=$(col generated_token_ids | sed -n "${r}p")
    for tp in 1 2 4; do
        got=$("$FORGE" run -m "$m" -p "$prompt" -n 64 --temp 0 --kv-type f32 -t 1 --device cpu \
              --tp $tp --ids 2>"$tmp/err" | sed -n 's/^ids: //p')
        if [ "$got" = "$want" ]; then tu_ok "greedy --tp $tp '$prompt'"
        else tu_fail "greedy --tp $tp '$prompt'" "got '$got' ($(tail -1 "$tmp/err"))"; fi
    done
    n_checked=$((n_checked + 1))
done
tu_check "references of stories260K found" [ "$n_checked" -ge 1 ]

# bench runs through it too
if "$FORGE" bench -m "$m" -p 16 -n 8 -r 1 -t 1 --device cpu --tp 2 >"$tmp/b" 2>"$tmp/err"; then
    tu_ok "bench --tp 2"
else tu_fail "bench --tp 2" "$(tail -1 "$tmp/err")"; fi

# refused: bad values (usage, 2), plans that cannot split (1), GPUs that are not there (1)
expect() { # name, status, pattern, args...
    local name=$1 want=$2 pat=$3; shift 3
    "$FORGE" "$@" >"$tmp/o" 2>"$tmp/e"
    local rc=$?
    if [ $rc -eq "$want" ] && grep -q -- "$pat" "$tmp/e"; then tu_ok "$name"
    else tu_fail "$name" "rc=$rc: $(head -2 "$tmp/e")"; fi
}
expect "--tp 0" 2 "bad value for --tp: '0'" run -m "$m" -p hi -n 1 --tp 0
expect "--tp 9" 2 "bad value for --tp: '9'" run -m "$m" -p hi -n 1 --tp 9
expect "--tp x" 2 "bad value for --tp" run -m "$m" -p hi -n 1 --tp x
expect "--tp 3: heads" 1 "--tp 3: the model's 8 attention heads and 4 KV heads must both divide by 3" \
    run -m "$m" -p hi -n 1 --device cpu --tp 3
expect "--tp 8: KV heads" 1 "4 KV heads must both divide by 8" run -m "$m" -p hi -n 1 --device cpu --tp 8
# without a usable GPU, --tp over GPUs (auto or gpu) is an error, never a quiet CPU run
if FORGE_GPU_LIB=/nonexistent/libforge_cuda.so "$FORGE" run -m "$m" -p hi -n 1 --tp 2 >"$tmp/o" 2>"$tmp/e"; then
    tu_fail "--tp 2 without a GPU" "ran"
elif grep -q -- "--tp" "$tmp/e"; then tu_ok "--tp 2 without a GPU"
else tu_fail "--tp 2 without a GPU" "$(head -2 "$tmp/e")"; fi
tu_done
