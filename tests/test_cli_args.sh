#!/usr/bin/env bash
# test_cli_args.sh - option validation and messages (issue 10): every malformed or out-of-range
# option of every command exits 2 with a message naming the option and what it accepts, before
# any file is opened (the model path given here does not exist, so a check made after opening
# would fail differently); -t above the CPU count warns; messages carry the "forge CMD:" prefix
# and say what is wrong (a directory, a missing option, a missing chat template); --show-prompt
# shows only prompts the user sent; tokenize escapes control bytes; counts are singular when 1.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
src=$shared/testdata/models/stories260K.gguf
tu_require "CLI arguments" "$src"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$src" "$tmp/m.gguf"
m=$tmp/m.gguf
none=$tmp/absent.gguf
cd "$tmp" || exit 1

# bad NAME OPT CMD... : exit 2, the message names OPT and what is expected, no output file made
bad() {
    local name=$1 opt=$2; shift 2
    "$@" </dev/null >/dev/null 2>"$tmp/err"
    local rc=$?
    if [ "$rc" -eq 2 ] && grep -qF -- "$opt" "$tmp/err" && grep -Eq "expected|must be" "$tmp/err" &&
        ! grep -q "absent.gguf\|No such file" "$tmp/err" && [ ! -e "$tmp/out.bin" ]; then
        tu_ok "bad option: $name"
    else
        tu_fail "bad option: $name" "exit $rc, stderr: $(head -1 "$tmp/err")"
    fi
}
for a in "--top-p 2" "--top-p -1" "--min-p -1" "--min-p 2" "--temp -1" "--temp inf" "--temp nan" \
    "--temp 1x" "--temp ''" "--repeat-penalty 0" "--repeat-penalty -1" \
    "--seed 99999999999999999999" "--seed -1" "--seed 1.5" "--seed ' 1'" "--top-k -2" "--top-k 1e3" \
    "--repeat-last-n -1" "--presence-penalty inf" "--frequency-penalty abc" "-n -2" "-n 1.5" \
    "-t 0" "-t 1025" "-c 0" "-c 12abc" "-b 0" "--gpu -1" "--kv-type q8" "--device tpu"; do
    eval "set -- $a"
    bad "run $a" "$1" "$FORGE" run -m "$none" -p x "$@"
done
for a in "--top-p 2" "--repeat-penalty 0" "--seed 99999999999999999999" "--vars '{bad'" \
    "--vars '[1]'" "-n x" "--min-p 2" "--temp -1"; do
    eval "set -- $a"
    bad "chat $a" "$1" "$FORGE" chat -m "$none" "$@"
done
bad "eval -t 0" "-t" "$FORGE" eval -m "$none" --tokens "1 2" --logits "$tmp/out.bin" -t 0
bad "perplexity --chunks 0" "--chunks" "$FORGE" perplexity -m "$none" -f "$none" --chunks 0
bad "perplexity -c -1" "-c" "$FORGE" perplexity -m "$none" -f "$none" -c -1
bad "bench -p -1" "-p" "$FORGE" bench -m "$none" -p -1
bad "bench -n x" "-n" "$FORGE" bench -m "$none" -n x
bad "bench -r 0" "-r" "$FORGE" bench -m "$none" -r 0
bad "bench -d 1,x" "-d" "$FORGE" bench -m "$none" -d 1,x
for a in "--now abc" "--now 1e9" "--now -5" "--now ''" "--vars '{bad'" "--vars '\"s\"'"; do
    eval "set -- $a"
    bad "template $a" "$1" "$FORGE" template --chat-template chatml --messages "$none" "$@"
done
bad "template --print-source nope" "--print-source" "$FORGE" template --print-source nope
bad "synth --type Q5_K (known but unsupported)" "--type" "$FORGE" synth --shape tiny --type Q5_K -o "$tmp/out.bin"
bad "synth --type bogus" "--type" "$FORGE" synth --shape tiny --type bogus -o "$tmp/out.bin"
bad "synth --seed 0x10" "--seed" "$FORGE" synth --shape tiny --type Q8_0 --seed 0x10 -o "$tmp/out.bin"
bad "synth --seed -1" "--seed" "$FORGE" synth --shape tiny --type Q8_0 --seed -1 -o "$tmp/out.bin"
"$FORGE" synth --shape nope --type Q8_0 -o "$tmp/out.bin" 2>/dev/null
tu_check "synth unknown --shape: exit 2 like --type" [ $? -eq 2 ]
bad "inspect --max-items -1" "--max-items" "$FORGE" inspect "$none" --max-items -1
bad "inspect --max-items 1x" "--max-items" "$FORGE" inspect "$none" --max-items 1x
bad "inspect --max-items overflow" "--max-items" "$FORGE" inspect "$none" --max-items 99999999999999999999

# the edges of each range are accepted
"$FORGE" run -m "$m" -p Once -n 1 --top-p 1 --min-p 0 --temp 0 --repeat-penalty 1 \
    --seed 18446744073709551615 --top-k -1 >/dev/null 2>"$tmp/err"
tu_check "range edges accepted" [ $? -eq 0 ]
"$FORGE" run -m "$m" -p Once -n 1 --top-p 0 --min-p 1 --temp 1e-3 >/dev/null 2>&1
tu_check "range edges accepted (other side)" [ $? -eq 0 ]
printf '{{ strftime_now("%%Y-%%m-%%d") }}' > "$tmp/now.jinja"
printf '[{"role": "user", "content": "hi"}]' > "$tmp/msgs.json"
tu_check "template --now 86400 is 1970-01-02" test "$("$FORGE" template --template "$tmp/now.jinja" --messages "$tmp/msgs.json" --now 86400)" = 1970-01-02
n_cpu=$(getconf _NPROCESSORS_ONLN)
"$FORGE" run -m "$m" -p Once -n 1 --temp 0 -t $((n_cpu + 1)) >/dev/null 2>"$tmp/err"
tu_check "-t above the CPU count: runs (exit 0)" [ $? -eq 0 ]
tu_check "-t above the CPU count: warns" grep -q "forge run: warning: -t $((n_cpu + 1)) is more than the $n_cpu CPUs" "$tmp/err"
"$FORGE" run -m "$m" -p Once -n 1 --temp 0 -t 1 >/dev/null 2>"$tmp/err"
tu_check "-t 1: no warning" bash -c "! grep -q warning '$tmp/err'"

# ---- messages --------------------------------------------------------------------------------
mkdir "$tmp/adir"
# msg NAME WANT CMD... : exit status != 0 and stderr has the fixed string WANT
msg() {
    local name=$1 want=$2; shift 2
    "$@" </dev/null >/dev/null 2>"$tmp/err"
    local rc=$?
    if [ "$rc" -ne 0 ] && grep -qF -- "$want" "$tmp/err"; then tu_ok "$name"
    else tu_fail "$name" "exit $rc, stderr: $(head -2 "$tmp/err" | tr '\n' '|')"; fi
}
msg "perplexity -f DIR" "forge perplexity: cannot read text file 'adir': Is a directory" "$FORGE" perplexity -m "$m" -f adir
msg "perplexity -f missing file" "forge perplexity: cannot read text file '/nonexistent-forge': No such file" "$FORGE" perplexity -m "$m" -f /nonexistent-forge
msg "tokenize -f DIR" "forge tokenize: cannot read text file 'adir': Is a directory" "$FORGE" tokenize -m "$m" -f adir
msg "tokenize -f missing file" "forge tokenize: cannot read text file '/nonexistent-forge'" "$FORGE" tokenize -m "$m" -f /nonexistent-forge
msg "template --messages DIR" "forge template: cannot read messages 'adir': Is a directory" "$FORGE" template --chat-template chatml --messages adir
tu_check "template --messages DIR: not called invalid JSON" bash -c "! grep -q 'not valid JSON' '$tmp/err'"
printf '/load adir\n/exit\n' | "$FORGE" chat -m "$m" >/dev/null 2>"$tmp/err"
tu_check "chat /load DIR" grep -qF "forge chat: cannot read conversation 'adir': Is a directory" "$tmp/err"
msg "perplexity without -f says so" "forge perplexity: -f TEXTFILE is required" "$FORGE" perplexity -m "$m"
msg "eval without --logits says so" "forge eval: --logits OUT.f32 is required" "$FORGE" eval -m "$m" --tokens "1 2"
msg "eval without --tokens says so" "forge eval: --tokens \"ID ...\" is required" "$FORGE" eval -m "$m" --logits x.f32
msg "template without --messages says so" "forge template: --messages FILE is required" "$FORGE" template --chat-template chatml
msg "tokenize without -m says so" "forge tokenize: -m MODEL is required" "$FORGE" tokenize -p x
msg "detokenize without -m says so" "forge detokenize: -m MODEL is required" "$FORGE" detokenize 1 2
msg "synth: one prefix, not 'forge synth: synth:'" "forge synth: $m has 512 tokens but shape 'llama2-7b' needs 32000" \
    "$FORGE" synth --shape llama2-7b --type Q8_0 --vocab-from "$m" -o "$tmp/big.gguf"
tu_check "synth: no doubled prefix anywhere" bash -c "! grep -q 'synth: synth:' '$tmp/err'"
tu_check "synth: a refused vocab leaves no file" bash -c "[ ! -e '$tmp/big.gguf' ] && [ -z \"\$(ls -A '$tmp' | grep '^\.big')\" ]"

# stories260K has no tokenizer.chat_template: the built-in fallback is announced
printf '/exit\n' | "$FORGE" chat -m "$m" >/dev/null 2>"$tmp/err"
tu_check "chat: missing chat template warns" grep -q "forge chat: warning: the model has no chat template; using the built-in 'llama2'" "$tmp/err"
"$FORGE" template --model "$m" --messages "$tmp/msgs.json" >/dev/null 2>"$tmp/err"
tu_check "template --model: missing chat template warns" grep -q "forge template: warning: the model has no chat template" "$tmp/err"
printf '/exit\n' | "$FORGE" chat -m "$m" --chat-template chatml >/dev/null 2>"$tmp/err"
tu_check "chat --chat-template: no fallback warning" bash -c "! grep -q warning '$tmp/err'"

# --show-prompt: no internal probe prompt; one block per turn
printf '/exit\n' | "$FORGE" chat -m "$m" --show-prompt >/dev/null 2>"$tmp/err"
tu_check "--show-prompt without a turn shows nothing" bash -c "! grep -q -- '--- prompt ---' '$tmp/err'"
printf 'Once\n/exit\n' | "$FORGE" chat -m "$m" --show-prompt -n 2 --temp 0 >/dev/null 2>"$tmp/err"
tu_check "--show-prompt: one prompt for one turn, the user's" bash -c "[ \$(grep -c -- '--- prompt ---' '$tmp/err') -eq 1 ] && grep -q Once '$tmp/err' && ! grep -q hello '$tmp/err'"

# tokenize: control bytes escaped, one line per token
"$FORGE" tokenize -m "$m" -p "$(printf 'a\\b\n\tc\001d\r')" > "$tmp/tok.txt"
n_ids=$("$FORGE" tokenize -m "$m" --ids -p "$(printf 'a\\b\n\tc\001d\r')" | wc -w)
tu_check "tokenize: one line per token" [ "$(wc -l < "$tmp/tok.txt")" -eq "$n_ids" ]
tu_check "tokenize: newline shown as \\n" grep -qF -- "-> '\\n'" "$tmp/tok.txt"
tu_check "tokenize: tab shown as \\t" grep -qF -- "-> '\\t'" "$tmp/tok.txt"
tu_check "tokenize: other control bytes as \\xNN" grep -qF -- "-> '\\x01'" "$tmp/tok.txt"
tu_check "tokenize: a backslash is doubled" grep -qF -- "-> '\\\\'" "$tmp/tok.txt"
tu_check "tokenize: no raw control byte in the output" bash -c "! LC_ALL=C grep -q '[[:cntrl:]]' '$tmp/tok.txt'"

# counts: "1 token", not "1 tokens"
: > "$tmp/empty.txt"
msg "perplexity: 'only 1 token'" "tokenizes to only 1 token" "$FORGE" perplexity -m "$m" -f "$tmp/empty.txt" -c 4
tu_check "perplexity: no '1 tokens'" bash -c "! grep -q ' 1 tokens' '$tmp/err'"
"$FORGE" run -m "$m" -p "" -n 1 --temp 0 >/dev/null 2>"$tmp/err"
tu_check "run: 'prompt 1 token', 'generated 1 token'" bash -c "grep -q 'prompt 1 token in' '$tmp/err' && grep -q 'generated 1 token in' '$tmp/err'"
tu_done
