#!/usr/bin/env bash
# test_cli_safety.sh - no command loses data (issue 10): output files never go onto an input
# (same device+inode: the model, a template file, stdin), are written beside the target and
# renamed into place only when whole, a failed write leaves the old file (or none) and no
# temporary file, a device/FIFO target is written in place and never removed, `synth -o` keeps
# an existing file unless --force; `/save` to a failing device does not crash; every command
# exits 1 with "forge CMD: cannot write output: REASON" when stdout cannot be written.
# Write failures on regular files are made with a file-size limit (ulimit -f, SIGXFSZ ignored).
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
src=$shared/testdata/models/stories260K.gguf
tu_require "CLI safety" "$src"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$src" "$tmp/m.gguf" && chmod 644 "$tmp/m.gguf"
cp "$src" "$tmp/pristine.gguf"
m=$tmp/m.gguf
cd "$tmp" || exit 1

# run_limited KB CMD...: CMD with files limited to KB KiB; a write past it fails with EFBIG
run_limited() { (trap '' XFSZ; ulimit -f "$1"; shift; exec "$@"); }
no_leftovers() { [ -z "$(ls -A "$tmp/$1" | grep '^\.')" ]; }
model_intact() { cmp -s "$m" "$tmp/pristine.gguf"; }

# ---- 1. /save onto a failing device: an error message, no double free -----------------------
if [ -c /dev/full ]; then
    printf '/save /dev/full\n/exit\n' | "$FORGE" chat -m "$m" >/dev/null 2>"$tmp/err"
    rc=$?
    tu_check "chat /save /dev/full: exit 0, no crash (rc $rc)" [ "$rc" -eq 0 ]
    tu_check "chat /save /dev/full: says why" grep -q "forge chat: cannot write '/dev/full': No space left on device" "$tmp/err"
    tu_check "chat /save /dev/full: no double free" bash -c "! grep -q 'double free' '$tmp/err'"
    tu_check "chat /save /dev/full: /dev/full still a device" [ -c /dev/full ]
else
    tu_skip "chat /save /dev/full" "/dev/full is absent"
fi

# ---- 2. never onto an input ----------------------------------------------------------------
"$FORGE" inspect "$m" --tensor output_norm.weight --dump "$m" 2>"$tmp/err"
tu_check "inspect --dump onto the model: exit 1" [ $? -eq 1 ]
tu_check "inspect --dump onto the model: says so" grep -q "forge inspect: --dump '.*m.gguf' is the input file" "$tmp/err"
tu_check "inspect --dump onto the model: model intact" model_intact
ln "$m" "$tmp/hardlink.gguf"
ln -s "$m" "$tmp/symlink.gguf"
"$FORGE" inspect "$m" --tensor output_norm.weight --dump "$tmp/hardlink.gguf" 2>/dev/null
tu_check "inspect --dump onto a hard link of the model: exit 1" [ $? -eq 1 ]
"$FORGE" inspect "$m" --tensor output_norm.weight --dump "$tmp/symlink.gguf" 2>/dev/null
tu_check "inspect --dump onto a symlink to the model: exit 1" [ $? -eq 1 ]
tu_check "links: model intact" model_intact
rm -f "$tmp/hardlink.gguf" "$tmp/symlink.gguf"

"$FORGE" eval -m "$m" --tokens "1 2 3" --logits "$m" 2>"$tmp/err"
tu_check "eval --logits onto the model: exit 1" [ $? -eq 1 ]
tu_check "eval --logits onto the model: says so" grep -q "forge eval: --logits '.*m.gguf' is the input file" "$tmp/err"
tu_check "eval --logits onto the model: model intact" model_intact

printf '/save %s\nOnce\n/exit\n' "$m" | "$FORGE" chat -m "$m" -n 4 --temp 0 >"$tmp/out" 2>"$tmp/err"
tu_check "chat /save onto the model: the chat goes on (exit 0)" [ $? -eq 0 ]
tu_check "chat /save onto the model: refused" grep -q "forge chat: /save '.*m.gguf' is the input file" "$tmp/err"
tu_check "chat /save onto the model: model intact" model_intact
tu_check "chat /save onto the model: the next turn answers" [ -s "$tmp/out" ]

printf '{{ "T:" }}{%% for m in messages %%}{{ m.content }}{%% endfor %%}' > "$tmp/t.jinja"
cp "$tmp/t.jinja" "$tmp/t.orig"
printf '/save t.jinja\n/exit\n' | "$FORGE" chat -m "$m" --chat-template t.jinja >/dev/null 2>"$tmp/err"
tu_check "chat /save onto the template file: refused" grep -q "is the input file 't.jinja'" "$tmp/err"
tu_check "chat /save onto the template file: intact" cmp -s "$tmp/t.jinja" "$tmp/t.orig"
printf '/save %s/in.txt\n/exit\n' "$tmp" > "$tmp/in.txt"
cp "$tmp/in.txt" "$tmp/in.orig"
"$FORGE" chat -m "$m" < "$tmp/in.txt" >/dev/null 2>"$tmp/err"
tu_check "chat /save onto its own stdin: refused" grep -q "is the input file '(stdin)'" "$tmp/err"
tu_check "chat /save onto its own stdin: intact" cmp -s "$tmp/in.txt" "$tmp/in.orig"

cp "$m" "$tmp/v.gguf"
"$FORGE" synth --shape tiny --type Q8_0 -o "$tmp/v.gguf" --vocab-from "$tmp/v.gguf" --force 2>"$tmp/err"
tu_check "synth -o onto --vocab-from (even with --force): exit 1" [ $? -eq 1 ]
tu_check "synth -o onto --vocab-from: intact" cmp -s "$tmp/v.gguf" "$tmp/pristine.gguf"

# ---- 2. temporary file + rename; never delete what was there ------------------------------
mkdir "$tmp/o"
"$FORGE" eval -m "$m" --tokens "1 2 3" --logits "$tmp/o/l.f32" 2>/dev/null
tu_check "eval --logits: 3 x 512 floats written" [ "$(stat -c %s "$tmp/o/l.f32")" -eq 6144 ]
echo OLD > "$tmp/o/l.f32"
chmod 600 "$tmp/o/l.f32"
run_limited 4 "$FORGE" eval -m "$m" --tokens "1 2 3" --logits "$tmp/o/l.f32" 2>"$tmp/err"
tu_check "eval --logits, write fails: exit 1" [ $? -eq 1 ]
tu_check "eval --logits, write fails: names the file and reason" grep -q "forge eval: cannot write '.*l.f32': File too large" "$tmp/err"
tu_check "eval --logits, write fails: the old file is kept" [ "$(cat "$tmp/o/l.f32")" = OLD ]
run_limited 4 "$FORGE" eval -m "$m" --tokens "1 2 3" --logits "$tmp/o/new.f32" 2>/dev/null
tu_check "eval --logits, write fails: no partial new file" [ ! -e "$tmp/o/new.f32" ]
tu_check "eval --logits, write fails: no temporary file left" no_leftovers o
"$FORGE" eval -m "$m" --tokens "1 2 3" --logits "$tmp/o/l.f32" 2>/dev/null
tu_check "eval --logits replaces a file: new content" [ "$(stat -c %s "$tmp/o/l.f32")" -eq 6144 ]
tu_check "eval --logits replaces a file: its mode kept" [ "$(stat -c %a "$tmp/o/l.f32")" = 600 ]

echo OLD > "$tmp/o/d.f32"
run_limited 8 "$FORGE" inspect "$m" --tensor token_embd.weight --dump "$tmp/o/d.f32" 2>"$tmp/err"
tu_check "inspect --dump, write fails: exit 1" [ $? -eq 1 ]
tu_check "inspect --dump, write fails: the old file is kept (not deleted)" [ "$(cat "$tmp/o/d.f32" 2>/dev/null)" = OLD ]
run_limited 8 "$FORGE" inspect "$m" --tensor token_embd.weight --dump "$tmp/o/d2.f32" 2>/dev/null
tu_check "inspect --dump, write fails: no partial new file" [ ! -e "$tmp/o/d2.f32" ]
tu_check "inspect --dump, write fails: no temporary file left" no_leftovers o

echo OLD > "$tmp/o/s.gguf"
run_limited 16 "$FORGE" synth --shape tiny --type F32 -o "$tmp/o/s.gguf" --force 2>"$tmp/err"
tu_check "synth -o --force, write fails: exit 1" [ $? -eq 1 ]
tu_check "synth -o --force, write fails: the old file is kept (not deleted)" [ "$(cat "$tmp/o/s.gguf" 2>/dev/null)" = OLD ]
tu_check "synth, write fails: the message names -o, not the temporary file" grep -q "forge synth: .*/o/s.gguf: write failed: File too large" "$tmp/err"
run_limited 16 "$FORGE" synth --shape tiny --type F32 -o "$tmp/o/s2.gguf" 2>/dev/null
tu_check "synth -o, write fails: no partial new file" [ ! -e "$tmp/o/s2.gguf" ]
tu_check "synth -o, write fails: no temporary file left" no_leftovers o

"$FORGE" synth --shape tiny --type Q8_0 -o "$tmp/o/s.gguf" 2>"$tmp/err"
tu_check "synth -o onto an existing file without --force: exit 1" [ $? -eq 1 ]
tu_check "synth -o existing: says to use --force" grep -q "forge synth: -o '.*s.gguf' exists; use --force" "$tmp/err"
tu_check "synth -o existing: untouched" [ "$(cat "$tmp/o/s.gguf")" = OLD ]
"$FORGE" synth --shape tiny --type Q8_0 -o "$tmp/o/s.gguf" --force 2>/dev/null
tu_check "synth -o existing --force: replaced by a valid GGUF" "$FORGE" inspect "$tmp/o/s.gguf" >/dev/null

printf '/save %s/o/c.json\n/exit\n' "$tmp" | run_limited 0 "$FORGE" chat -m "$m" >/dev/null 2>"$tmp/err"
tu_check "chat /save, write fails: exit 0 (the chat goes on)" [ $? -eq 0 ]
tu_check "chat /save, write fails: no partial file, no temporary file" bash -c "[ ! -e '$tmp/o/c.json' ] && [ -z \"\$(ls -A '$tmp/o' | grep '^\.')\" ]"
echo '[]' > "$tmp/o/c.json"
printf 'Once\n/save %s/o/c.json\n/exit\n' "$tmp" | "$FORGE" chat -m "$m" -n 2 --temp 0 >/dev/null 2>"$tmp/err"
tu_check "chat /save replaces a file" grep -q '"user"' "$tmp/o/c.json"
tu_check "chat /save: one message counted right" bash -c "printf '/system be brief\n/save $tmp/o/c1.json\n/exit\n' | '$FORGE' chat -m '$m' 2>&1 >/dev/null | grep -q 'saved 1 message to'"

# a synth ended by SIGTERM leaves neither a partial file nor its temporary file
mkdir "$tmp/k"
"$FORGE" synth --shape tinyllama-1.1b --type F32 -o "$tmp/k/big.gguf" 2>/dev/null &
pid=$!
for i in $(seq 500); do [ -n "$(ls -A "$tmp/k")" ] && break; sleep 0.01; done
kill -TERM "$pid" 2>/dev/null
wait "$pid"
rc=$?
if [ "$rc" -eq 0 ]; then
    tu_skip "synth killed" "it finished before the signal"
    rm -f "$tmp/k/big.gguf"
else
    tu_check "synth killed by SIGTERM (rc $rc): no partial file, no temporary file" [ -z "$(ls -A "$tmp/k")" ]
fi

# a device or FIFO is written in place, never renamed over or removed
"$FORGE" inspect "$m" --tensor output_norm.weight --dump /dev/null 2>/dev/null
tu_check "inspect --dump /dev/null: exit 0" [ $? -eq 0 ]
tu_check "inspect --dump /dev/null: still a device" [ -c /dev/null ]
mkfifo "$tmp/fifo"
timeout 60 cat "$tmp/fifo" > "$tmp/fifo.out" & # bounded: a forge that never opens it
"$FORGE" inspect "$m" --tensor output_norm.weight --dump "$tmp/fifo" 2>/dev/null
rc=$?
wait
tu_check "inspect --dump FIFO: exit 0, 64 floats through it" bash -c "[ $rc -eq 0 ] && [ \$(stat -c %s '$tmp/fifo.out') -eq 256 ]"
tu_check "inspect --dump FIFO: still a FIFO" [ -p "$tmp/fifo" ]
if [ -c /dev/full ]; then
    "$FORGE" eval -m "$m" --tokens "1 2" --logits /dev/full 2>"$tmp/err"
    tu_check "eval --logits /dev/full: exit 1 with the reason" bash -c "[ $? -eq 1 ] && grep -q 'No space left' '$tmp/err'"
    "$FORGE" inspect "$m" --tensor output_norm.weight --dump /dev/full 2>"$tmp/err"
    tu_check "inspect --dump /dev/full: exit 1 with the reason" bash -c "[ $? -eq 1 ] && grep -q 'No space left' '$tmp/err'"
    "$FORGE" synth --shape tiny --type Q8_0 -o /dev/full 2>"$tmp/err"
    tu_check "synth -o /dev/full: exit 1 with the reason" bash -c "[ $? -eq 1 ] && grep -q 'No space left' '$tmp/err'"
    tu_check "writers never removed /dev/full" [ -c /dev/full ]
else
    tu_skip "writes to /dev/full" "/dev/full is absent"
fi

# ---- 3. stdout that cannot be written ------------------------------------------------------
if [ -c /dev/full ]; then
    for i in $(seq 40); do printf 'Once upon a time there was a little girl. '; done > "$tmp/text.txt"
    printf '[{"role": "user", "content": "hi"}]' > "$tmp/msgs.json"
    # full_check NAME CMD... : with stdout on /dev/full, exit 1 and "forge CMD: cannot write output"
    full_check() {
        local name=$1 cmdname=$2; shift 2
        "$@" </dev/null >/dev/full 2>"$tmp/err"
        local rc=$?
        if [ "$rc" -eq 1 ] && grep -q "^forge${cmdname:+ $cmdname}: cannot write output: No space left on device$" "$tmp/err"; then
            tu_ok "stdout full: $name"
        else
            tu_fail "stdout full: $name" "exit $rc, stderr: $(tail -1 "$tmp/err")"
        fi
    }
    full_check "run" run "$FORGE" run -m "$m" -p Once -n 8 --temp 0
    full_check "run --help" run "$FORGE" run --help
    full_check "chat" chat bash -c "echo Once | '$FORGE' chat -m '$m' -n 4 --temp 0"
    full_check "template" template "$FORGE" template --chat-template chatml --messages "$tmp/msgs.json"
    full_check "template --list" template "$FORGE" template --list
    full_check "template --print-source" template "$FORGE" template --print-source chatml
    full_check "bench" bench "$FORGE" bench -m "$m" -p 4 -n 2 -r 1
    full_check "bench --json" bench "$FORGE" bench -m "$m" -p 4 -n 2 -r 1 --json
    full_check "perplexity" perplexity "$FORGE" perplexity -m "$m" -f "$tmp/text.txt" -c 16
    full_check "inspect" inspect "$FORGE" inspect "$m"
    full_check "inspect --json" inspect "$FORGE" inspect "$m" --json
    full_check "inspect --tensor" inspect "$FORGE" inspect "$m" --tensor output_norm.weight
    full_check "tokenize" tokenize "$FORGE" tokenize -m "$m" -p "Once upon a time"
    full_check "tokenize --ids" tokenize "$FORGE" tokenize -m "$m" --ids -p "Once upon a time"
    full_check "detokenize" detokenize "$FORGE" detokenize -m "$m" 400 401
    full_check "synth --help" synth "$FORGE" synth --help
    full_check "forge --help" "" "$FORGE" --help
    full_check "forge --version" "" "$FORGE" --version
else
    tu_skip "stdout on /dev/full" "/dev/full is absent"
fi
tu_check "after everything: model intact" model_intact
tu_done
