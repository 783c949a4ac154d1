#!/usr/bin/env bash
# test_engine_cli.sh - `forge run` and `forge chat` generate through forge_engine: what that adds
# to test_run.sh / test_chat.sh (which check the unchanged outputs). The chat's second turn finds
# its history in the engine's prefix cache (in whole blocks: --block-size 32 reuses a multiple of
# 32) and answers as a fresh process does; /stats reports the reuse; sampled chats are
# reproducible and /reset restarts the draws; the pool options reach the engine and keep the
# output; a pool too small is a clear error; the end of the context is reported; Ctrl-C stops a
# `forge run` answer with what was generated; bad values exit 2 naming the option.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
m=$shared/testdata/models/stories260K.gguf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tu_require "run/chat on the engine" "$m"
chat=("$FORGE" chat -m "$m" --temp 0 -n 24 -c 512 -t 2 --stats)
reused_of() { grep '^\[turn:' "$1" | sed -n "${2}p" | sed 's/.*, \([0-9]*\) reused.*/\1/'; }

# ---- the outputs of the loops the engine replaced (recorded from the CLI before it) -----------
# stdout (text + ids) of sampled and penalised runs, md5: byte-identical through the engine
pin() { # pin NAME MD5 ARGS...  (FORGE_ISA from the caller's environment)
    local n=$1 want=$2
    shift 2
    local got
    got=$("$FORGE" run "$@" -t 2 --ids 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$got" = "$want" ]; then tu_ok "$n"; else tu_fail "$n" "md5 $got, before the engine $want"; fi
}
q4=$shared/testdata/models/stories260K-Q4_0-mix.gguf
pen=(--top-k 20 --top-p 0.9 --min-p 0.02 --repeat-penalty 1.3 --presence-penalty 0.5 --frequency-penalty 0.2)
pin "run sampled --seed 7 as before" de94e7f59bfb56ee51b9339da819bd3e -m "$m" -p "The little dog" -n 60 --seed 7 --temp 1
pin "run sampled with penalties as before" baf0153a9b4bf6cabc249c26ba79a031 -m "$m" -p Lily -n 80 --seed 3 --temp 0.9 "${pen[@]}"
pin "run greedy with penalties as before" f153ff747380b497b623b48cfbefeb4b -m "$m" -p Lily -n 80 --temp 0 --repeat-penalty 1.5 --repeat-last-n 16
# Q4_0 through the scalar kernels: the pinned outputs are theirs (the AVX-512 kernels give the
# same bits; the AVX2 one-token kernel sums the blocks in another order, and a draw at
# temperature 1 follows the last bits of the logits)
FORGE_ISA=scalar pin "run Q4_0-mix sampled as before" 0191c2b5a21b79ff4eff074e8539d5fd -m "$q4" -p "The little dog" -n 60 --seed 7 --temp 1
FORGE_ISA=scalar pin "run Q4_0-mix sampled with penalties as before" bd70e36c971bd3e9c62c37ea5cc62ecd -m "$q4" -p Lily -n 80 --seed 3 --temp 0.9 "${pen[@]}"
# a sampled chat's first answer as before (later answers draw with seed + k, see below)
got=$(printf 'Hello there\n' | "$FORGE" chat -m "$m" --seed 9 --temp 0.7 --repeat-penalty 1.2 -n 30 -c 512 -t 2 2>/dev/null | head -1 | md5sum | cut -d' ' -f1)
tu_check "chat sampled first answer as before" test "$got" = 52c132a2ba1f96665bcff18129203f0f

# ---- chat: prefix reuse ----------------------------------------------------------------------
printf 'Hello there\nTell me about the dog\n/stats\n' | "${chat[@]}" >"$tmp/out" 2>"$tmp/err"
tu_check "chat: two turns, exit 0" bash -c "[ $? -eq 0 ] && [ \$(grep -c '^\[turn:' '$tmp/err') -eq 2 ]"
r1=$(reused_of "$tmp/err" 1)
r2=$(reused_of "$tmp/err" 2)
tu_check "chat: turn 1 reuses nothing ($r1)" test "$r1" = 0
tu_check "chat: turn 2 reuses cached tokens of turn 1 ($r2 > 0, whole blocks of 16)" \
    bash -c "[ '${r2:-0}' -gt 0 ] && [ \$(( ${r2:-1} % 16 )) -eq 0 ]"
stats=$(grep '^\[prompt tokens' "$tmp/err")
cached=$(echo "$stats" | sed 's/.*tokens [0-9]*, \([0-9]*\) of them reused.*/\1/')
tu_check "/stats: cached prompt tokens = turn 2's reuse ($cached = $r2)" test -n "$cached" -a "$cached" = "$r2"
tu_check "/stats: generated tokens counted" bash -c "echo '$stats' | grep -q 'generated 48;'"

# --block-size 32: the reuse is a multiple of 32, and the answers are the same
long='Hello there, tell me a story about a little dog and a big cat who play in the park'
printf '%s\nTell me about the dog\n' "$long" | "${chat[@]}" >"$tmp/out16" 2>"$tmp/err16"
printf '%s\nTell me about the dog\n' "$long" | "${chat[@]}" --block-size 32 >"$tmp/out32" 2>"$tmp/err32"
r2b=$(reused_of "$tmp/err32" 2)
tu_check "chat --block-size 32: turn 2 reuses whole blocks of 32 ($r2b)" \
    bash -c "[ '${r2b:-0}' -gt 0 ] && [ \$(( ${r2b:-1} % 32 )) -eq 0 ]"
tu_check "chat --block-size 32: the same answers as blocks of 16" cmp -s "$tmp/out16" "$tmp/out32"
# a larger pool keeps the same answers
printf 'Hello there\nTell me about the dog\n' | "${chat[@]}" --kv-size 4096 >"$tmp/outk" 2>/dev/null
tu_check "chat --kv-size 4096: the same answers" cmp -s "$tmp/out" "$tmp/outk"

# ---- chat: sampling --------------------------------------------------------------------------
schat=("$FORGE" chat -m "$m" --temp 0.8 --seed 5 -n 20 -c 512 -t 2)
printf 'Hello there\nTell me about the dog\n' | "${schat[@]}" >"$tmp/s1" 2>/dev/null
printf 'Hello there\nTell me about the dog\n' | "${schat[@]}" >"$tmp/s2" 2>/dev/null
tu_check "sampled chat: same seed, same answers" cmp -s "$tmp/s1" "$tmp/s2"
printf 'Hello there\n/reset\nHello there\n' | "${schat[@]}" >"$tmp/s3" 2>/dev/null
tu_check "sampled chat: after /reset the first answer comes again" \
    bash -c "[ -n \"\$(sed -n 1p '$tmp/s3')\" ] && [ \"\$(sed -n 1p '$tmp/s3')\" = \"\$(sed -n 2p '$tmp/s3')\" ]"
printf 'Hello there\nHello there\n' | "${schat[@]}" >"$tmp/s4" 2>/dev/null
tu_check "sampled chat: answer 2 draws with the next seed (differs from answer 1)" \
    bash -c "[ \"\$(sed -n 1p '$tmp/s4')\" != \"\$(sed -n 2p '$tmp/s4')\" ]"

# -n 0: the prompt is read (and cached), no answer
printf 'Hello there\nTell me about the dog\n' | "$FORGE" chat -m "$m" --temp 0 -n 0 -c 512 -t 2 --stats >"$tmp/o" 2>"$tmp/e"
tu_check "chat -n 0: two empty answers" bash -c "[ \"\$(od -An -c '$tmp/o' | tr -d ' ')\" = '\n\n' ] && [ \$(grep -c 'answer 0 tokens (limit)' '$tmp/e') -eq 2 ]"

# ---- chat: the end of the context ------------------------------------------------------------
printf 'Hello\n' | "$FORGE" chat -m "$m" --temp 0 -n -1 -c 64 -t 2 --stats >/dev/null 2>"$tmp/err"
tu_check "chat: a full context is reported" bash -c "grep -q '^\[the context of 64 tokens is full' '$tmp/err' && grep -q '(context full)\]' '$tmp/err'"

# ---- run: pool options, limits ---------------------------------------------------------------
ids() { sed -n 's/^ids: //p' "$1"; }
"$FORGE" run -m "$m" -p "Once upon a time" -n 40 --temp 0 -t 2 --ids >"$tmp/a" 2>/dev/null
"$FORGE" run -m "$m" -p "Once upon a time" -n 40 --temp 0 -t 2 --ids --block-size 32 --kv-size 1000 >"$tmp/b" 2>"$tmp/e"
tu_check "run --block-size 32 --kv-size 1000: exit 0, same ids" bash -c "[ $? -eq 0 ] && [ -n \"\$(sed -n 's/^ids: //p' '$tmp/a')\" ] && cmp -s '$tmp/a' '$tmp/b'"
"$FORGE" run -m "$m" -p "Once upon a time" -n 40 --temp 0 -t 2 --kv-size 16 >"$tmp/o" 2>"$tmp/e"
rc=$?
tu_check "run --kv-size 16 (too small): exit 1, the pool named, no output" \
    bash -c "[ $rc -eq 1 ] && grep -q 'forge run: .*pool has 1 (16 tokens)' '$tmp/e' && [ ! -s '$tmp/o' ]"
"$FORGE" run -m "$m" -p "Once upon a time" -c 16 --temp 0 -t 1 --ids >"$tmp/o" 2>"$tmp/e"
tu_check "run -c 16: 12 tokens, the full context reported" \
    bash -c "[ \$(sed -n 's/^ids: //p' '$tmp/o' | wc -w) -eq 12 ] && grep -q 'stopped: the context of 16 tokens is full' '$tmp/e'"
"$FORGE" run -m "$m" -p "Once upon a time" -n 0 --temp 0 -t 1 --ids >"$tmp/o" 2>"$tmp/e"
tu_check "run -n 0: no token, the prompt timed" \
    bash -c "[ \"\$(cat '$tmp/o')\" = \"\$(printf '\nids:')\" ] && grep -q 'prompt 5 tokens in .*generated 0 tokens' '$tmp/e'"

# ---- run: Ctrl-C keeps what was generated ----------------------------------------------------
"$FORGE" run -m "$m" -p "Once upon a time" -n -1 -c 200000 -t 1 --temp 1 --seed 1 --ids >"$tmp/o" 2>"$tmp/e" &
pid=$!
for _ in $(seq 300); do [ -s "$tmp/o" ] && break; sleep 0.05; done
kill -INT "$pid" 2>/dev/null
for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$pid" 2>/dev/null && kill -TERM "$pid"
wait "$pid"
rc=$?
n=$(ids "$tmp/o" | wc -w)
tu_check "run, SIGINT while generating: exit 0, stopped: interrupted" bash -c "[ $rc -eq 0 ] && grep -q 'stopped: interrupted' '$tmp/e'"
tu_check "run, SIGINT while generating: the ids so far ($n) are printed" test "$n" -gt 0

# ---- bad values ------------------------------------------------------------------------------
bad() { # bad NAME MESSAGE ARGS...
    local n=$1 msg=$2
    shift 2
    "$@" </dev/null >"$tmp/o" 2>"$tmp/e"
    local rc=$?
    if [ $rc -eq 2 ] && grep -qF -- "$msg" "$tmp/e"; then tu_ok "$n"
    else tu_fail "$n" "rc=$rc: $(head -c 300 "$tmp/e")"; fi
}
for cmd in run chat; do
    args=(-m "$m")
    [ $cmd = run ] && args+=(-p x)
    for v in 0 -1 abc 12k ""; do
        bad "$cmd --kv-size '$v'" "forge $cmd: bad value for --kv-size: '$v'" "$FORGE" $cmd "${args[@]}" --kv-size "$v"
    done
    for v in 8 48 abc; do
        bad "$cmd --block-size '$v'" "forge $cmd: bad value for --block-size: '$v' (expected 16 or 32)" "$FORGE" $cmd "${args[@]}" --block-size "$v"
    done
    bad "$cmd --kv-size without a value" "forge $cmd: --kv-size needs a value" "$FORGE" $cmd "${args[@]}" --kv-size
    # one request at a time: --parallel is no option of run or chat
    bad "$cmd --parallel is unknown" "unknown option or missing value '--parallel'" "$FORGE" $cmd "${args[@]}" --parallel 2
done
bad "eval takes no --kv-size" "unknown option '--kv-size'" "$FORGE" eval -m "$m" --tokens "1 2" --logits "$tmp/l" --kv-size 64
tu_done
