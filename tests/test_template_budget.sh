#!/usr/bin/env bash
# test_template_budget.sh - a hostile chat template (issue 10: 'a' * 16000000 then |length in a
# 100000-iteration loop, ~15 minutes before the fix) ends quickly with a clear LimitError, from a
# template file and from a GGUF's tokenizer.chat_template: `forge template` exits 1, `forge chat`
# exits 1 before its first prompt instead of hanging; --template-timeout MS sets the wall-clock
# budget and names the template in the error. Every command runs under `timeout 60` so a
# regression fails instead of hanging.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
model="$shared/testdata/models/stories260K.gguf"
tu_require "template budget (needs the stories260K model)" "$model"
command -v python3 >/dev/null || { tu_fail "python3 is needed to write the hostile GGUF"; tu_done; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

hostile="{% set s = 'a' * 16000000 %}{% for i in range(100000) %}{{ s|length }}{% endfor %}"
printf '%s' "$hostile" >"$tmp/hostile.jinja"
printf '%s' '[{"role": "user", "content": "hi"}]' >"$tmp/m.json"

# copy of MODEL with tokenizer.chat_template set to TEMPLATE (GGUF v2/v3: KVs, tensor infos,
# aligned data; the data is copied unchanged after the re-aligned header)
with_template() { # MODEL TEMPLATE_FILE OUT
    python3 - "$@" <<'EOF'
import struct, sys
src, tmpl_path, out = sys.argv[1:4]
d = open(src, 'rb').read()
tmpl = open(tmpl_path, 'rb').read()
magic, ver, n_t, n_kv = struct.unpack_from('<4sIQQ', d, 0)
assert magic == b'GGUF' and ver in (2, 3)
pos = 24
fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
def string(p):
    n, = struct.unpack_from('<Q', d, p)
    return d[p + 8:p + 8 + n], p + 8 + n
def value(t, p):
    if t == 8:
        return string(p)[1]
    if t == 9:
        et, cnt = struct.unpack_from('<IQ', d, p)
        p += 12
        for _ in range(cnt):
            p = value(et, p)
        return p
    return p + fixed[t]
kvs, align = [], 32
for _ in range(n_kv):
    start = pos
    key, pos = string(pos)
    t, = struct.unpack_from('<I', d, pos)
    end = value(t, pos + 4)
    if key == b'general.alignment':
        align, = struct.unpack_from('<I', d, pos + 4)
    if key != b'tokenizer.chat_template':
        kvs.append(d[start:end])
    pos = end
tinfo_start = pos
for _ in range(n_t):
    _, pos = string(pos)
    nd, = struct.unpack_from('<I', d, pos)
    pos += 4 + 8 * nd + 4 + 8
tinfos = d[tinfo_start:pos]
data_start = (pos + align - 1) // align * align
key = b'tokenizer.chat_template'
kvs.append(struct.pack('<Q', len(key)) + key + struct.pack('<IQ', 8, len(tmpl)) + tmpl)
head = struct.pack('<4sIQQ', b'GGUF', ver, n_t, len(kvs)) + b''.join(kvs) + tinfos
head += b'\0' * ((-len(head)) % align)
open(out, 'wb').write(head + d[data_start:])
EOF
}
with_template "$model" "$tmp/hostile.jinja" "$tmp/hostile.gguf" ||
    { tu_fail "write the hostile GGUF"; tu_done; exit 1; }
printf '%s' '{{ messages[0].content }}!' >"$tmp/ok.jinja"
with_template "$model" "$tmp/ok.jinja" "$tmp/ok.gguf"

# the GGUF writer above is right: a harmless template in the same way is read back and used
timeout 60 "$FORGE" template --model "$tmp/ok.gguf" --messages "$tmp/m.json" >"$tmp/out" 2>"$tmp/err"
tu_check "a template set in a copied GGUF renders (the test's GGUF writing works)" \
    test "$(cat "$tmp/out")" = "hi!"

# expect_limit NAME WANT_TEXT CMD... : exit 1 (not a hang: timeout gives 124), WANT_TEXT on stderr
expect_limit() {
    local name=$1 want=$2; shift 2
    timeout 60 "$@" >"$tmp/out" 2>"$tmp/err" </dev/null
    local rc=$?
    if [ "$rc" -ne 1 ]; then tu_fail "$name" "exit $rc, stderr: $(head -c 300 "$tmp/err")"; return; fi
    if ! grep -qE -- "$want" "$tmp/err"; then tu_fail "$name" "stderr: $(head -c 300 "$tmp/err")"; return; fi
    tu_ok "$name"
}
limit_re='LimitError: template (evaluation exceeded [0-9]+ steps|render exceeded its time budget)'
expect_limit "forge template --template HOSTILE: clear LimitError, exit 1" "$limit_re" \
    "$FORGE" template --template "$tmp/hostile.jinja" --messages "$tmp/m.json"
expect_limit "forge template --model (hostile tokenizer.chat_template): LimitError, exit 1" \
    "$limit_re" "$FORGE" template --model "$tmp/hostile.gguf" --messages "$tmp/m.json"
expect_limit "--template-timeout 1: the time budget's message names the file" \
    "render exceeded its time budget of 1 ms \\($tmp/hostile.jinja\\)" \
    "$FORGE" template --template "$tmp/hostile.jinja" --messages "$tmp/m.json" --template-timeout 1
expect_limit "--template-timeout 1 with --model: names the model's template" \
    "render exceeded its time budget of 1 ms \\(the model's chat template\\)" \
    "$FORGE" template --model "$tmp/hostile.gguf" --messages "$tmp/m.json" --template-timeout 1

# forge chat: the template is tried on a plain conversation before the first prompt; a budget
# error ends the command there (exit 1), instead of stalling every turn
printf 'hello\n' >"$tmp/in"
timeout 60 "$FORGE" chat -m "$tmp/hostile.gguf" -n 4 <"$tmp/in" >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ "$rc" -eq 1 ] && grep -qE "^forge chat: .*$limit_re" "$tmp/err" && [ ! -s "$tmp/out" ] &&
    ! grep -q "template: the model's" "$tmp/err"; then
    tu_ok "forge chat with a hostile model template exits 1 before the first prompt"
else
    tu_fail "forge chat with a hostile model template exits 1 before the first prompt" \
        "exit $rc, stdout $(head -c 100 "$tmp/out"), stderr: $(head -c 300 "$tmp/err")"
fi
expect_limit "forge chat --template-timeout 1: the time budget's message names the template" \
    "render exceeded its time budget of 1 ms \\(the model's chat template\\)" \
    "$FORGE" chat -m "$tmp/hostile.gguf" -n 4 --template-timeout 1
expect_limit "forge chat --chat-template HOSTILE_FILE: LimitError, exit 1" "$limit_re" \
    "$FORGE" chat -m "$model" -n 4 --chat-template "$tmp/hostile.jinja"

# the same model with a harmless template still chats (the probe does not reject good templates)
timeout 60 "$FORGE" chat -m "$tmp/ok.gguf" -n 2 --seed 1 <"$tmp/in" >"$tmp/out" 2>"$tmp/err"
tu_check "forge chat with a harmless model template runs a turn (exit 0)" test $? -eq 0

# bad values: exit 2 with the option named, before anything is loaded
for cmd in template chat; do
    for bad in 0 -5 abc 99999999999; do
        timeout 60 "$FORGE" $cmd --template-timeout "$bad" -m "$tmp/hostile.gguf" \
            --messages "$tmp/m.json" >"$tmp/out" 2>"$tmp/err" </dev/null
        rc=$?
        if [ "$rc" -eq 2 ] && grep -q -- "--template-timeout" "$tmp/err"; then
            tu_ok "forge $cmd --template-timeout $bad: exit 2 naming the option"
        else
            tu_fail "forge $cmd --template-timeout $bad: exit 2 naming the option" \
                "exit $rc, stderr: $(head -c 200 "$tmp/err")"
        fi
    done
done
tu_done
