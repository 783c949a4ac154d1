#!/usr/bin/env bash
# test_chat.sh - `forge chat` driven as a user would: turns piped on stdin, the KV cache reused
# between turns (and giving the same answer as a fresh process), /reset, /system, /save, /load,
# /exit, Ctrl-C (SIGINT) stopping an answer but not the program, a pseudo-terminal session
# through script(1), and bad options. stories260K with the built-in llama2 template, greedy.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
model=$shared/testdata/models/stories260K.gguf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tu_require "forge chat" "$model"
chat=("$FORGE" chat -m "$model" --temp 0 -n 24 -c 512 -t 2 --stats)

# two turns, then /save; answers are printed one per turn
printf 'Hello there\nTell me about the dog\n/save %s\n/exit\nnever sent\n' "$tmp/conv.json" |
    "${chat[@]}" >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "two piped turns exit 0" test $rc -eq 0
tu_check "template reported (built-in llama2 for this model)" grep -q 'template: llama2' "$tmp/err"
turns=$(grep -c '^\[turn:' "$tmp/err")
tu_check "two turns ran (not the line after /exit)" test "$turns" -eq 2
tu_check "two answers on stdout" test "$(grep -c . "$tmp/out")" -ge 2
reused=$(grep '^\[turn:' "$tmp/err" | sed -n 2p | sed 's/.*, \([0-9]*\) reused.*/\1/')
tu_check "turn 2 reuses the KV cache of turn 1 ($reused tokens)" test "${reused:-0}" -gt 0
tu_check "/save wrote 4 messages" test "$(jq length "$tmp/conv.json" 2>/dev/null || grep -c '"role"' "$tmp/conv.json")" -eq 4
answer2=$(sed -n 2p "$tmp/out")

# the cached turn 2 equals turn 2 computed from scratch: /load turn 1 into a fresh process
jq '.[0:2]' "$tmp/conv.json" >"$tmp/turn1.json" 2>/dev/null ||
    python3 -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:2], open(sys.argv[2], 'w'))" "$tmp/conv.json" "$tmp/turn1.json"
printf '/load %s\nTell me about the dog\n' "$tmp/turn1.json" | "${chat[@]}" >"$tmp/out2" 2>"$tmp/err2"
tu_check "/load restores the conversation" grep -q 'loaded 2 messages' "$tmp/err2"
fresh=$(sed -n 1p "$tmp/out2")
if [ -n "$answer2" ] && [ "$fresh" = "$answer2" ]; then tu_ok "answer with the reused cache = answer from scratch"
else tu_fail "answer with the reused cache = answer from scratch" "cached [$answer2] fresh [$fresh]"; fi

# /reset: the next turn renders a one-message conversation again (same answer as the first turn)
printf 'Hello there\nWhat next\n/reset\nHello there\n' | "${chat[@]}" >"$tmp/out3" 2>"$tmp/err3"
tu_check "/reset acknowledged" grep -q 'conversation reset' "$tmp/err3"
p1=$(grep '^\[turn:' "$tmp/err3" | sed -n 1p | sed 's/.*prompt \([0-9]*\) tokens.*/\1/')
p3=$(grep '^\[turn:' "$tmp/err3" | sed -n 3p | sed 's/.*prompt \([0-9]*\) tokens.*/\1/')
tu_check "after /reset the prompt is as short as the first ($p1 = $p3)" test -n "$p1" -a "$p1" = "$p3"
tu_check "after /reset the answer repeats the first" test "$(sed -n 1p "$tmp/out3")" = "$(sed -n 3p "$tmp/out3")"

# /system changes the prompt (the system text is in it)
printf '/system You are a cat\nHi\n' | "${chat[@]}" --show-prompt >"$tmp/out4" 2>"$tmp/err4"
tu_check "/system text reaches the prompt" grep -q '<<SYS>>' "$tmp/err4"
tu_check "/system text reaches the prompt (content)" grep -q 'You are a cat' "$tmp/err4"

# unknown command and bad /load: messages, the chat goes on
printf '{"x": 1}' >"$tmp/bad.json"
printf '/frobnicate\n/load %s\nHi\n' "$tmp/bad.json" | "${chat[@]}" >"$tmp/out5" 2>"$tmp/err5"
tu_check "unknown command reported" grep -q "unknown command '/frobnicate'" "$tmp/err5"
tu_check "bad /load file reported clearly" grep -q 'expected a JSON array' "$tmp/err5"
tu_check "the chat goes on after bad commands" test "$(grep -c '^\[turn:' "$tmp/err5")" -eq 1

# Ctrl-C: SIGINT during a long answer stops it; the next message is still answered
mkfifo "$tmp/fifo"
"$FORGE" chat -m "$model" --temp 0 -n -1 -c 32768 -t 2 --stats <"$tmp/fifo" >"$tmp/out6" 2>"$tmp/err6" &
pid=$!
exec 3>"$tmp/fifo"
echo "Tell me a very long story" >&3
for _ in $(seq 50); do grep -q '^forge chat:' "$tmp/err6" && break; sleep 0.1; done
sleep 0.5
kill -INT "$pid" 2>/dev/null
# wait until the first turn is over, then ask again
for _ in $(seq 200); do grep -q '^\[turn:' "$tmp/err6" && break; sleep 0.1; done
size0=$(stat -c %s "$tmp/out6")
echo "/system short" >&3
echo "Hi" >&3
# the second answer would run to the end of the (large) context: interrupt it too, once it is
# streaming (waiting on the output, not on a clock, keeps this right on a slow sanitizer build)
for _ in $(seq 300); do [ "$(stat -c %s "$tmp/out6")" -gt "$size0" ] && break; sleep 0.1; done
kill -INT "$pid" 2>/dev/null
echo "/exit" >&3
exec 3>&-
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && kill -TERM "$pid"
wait "$pid"
rc=$?
tu_check "SIGINT interrupts the answer" grep -q '^\[interrupted\]' "$tmp/err6"
tu_check "the first answer ended by the interrupt" grep -q 'answer [0-9]* tokens (interrupted)' "$tmp/err6"
tu_check "the program goes on after the interrupt (second turn ran)" test "$(grep -c '^\[turn:' "$tmp/err6")" -ge 2
tu_check "exit status 0 after an interrupted answer" test $rc -eq 0

# a pseudo-terminal: interactive prompt "> ", turns, /exit
if command -v script >/dev/null; then
    printf 'Hello there\n/exit\n' | script -qec "$FORGE chat -m $model --temp 0 -n 12 -c 256 -t 2" /dev/null >"$tmp/out7" 2>&1
    tu_check "tty session shows the '> ' prompt" grep -q '> ' "$tmp/out7"
    tu_check "tty session shows the command hint" grep -q '/help for commands' "$tmp/out7"
else
    tu_skip "tty session" "script(1) is not installed"
fi

# bad options: clear errors, exit codes
"$FORGE" chat -m "$model" --chat-template nosuch </dev/null >"$tmp/o" 2>"$tmp/e"
rc=$?
tu_check "unknown --chat-template: exit 1 with a message" test $rc -eq 1 -a -n "$(grep 'neither a built-in' "$tmp/e")"
"$FORGE" chat -m "$model" --bogus </dev/null >"$tmp/o" 2>"$tmp/e"
tu_check "unknown option: exit 2" test $? -eq 2
printf 'Hi\n' | "$FORGE" chat -m "$model" --chat-template chatml --temp 0 -n 8 -c 256 --show-prompt >"$tmp/o" 2>"$tmp/e"
tu_check "--chat-template chatml is used" grep -q '<|im_start|>user' "$tmp/e"
tu_done
