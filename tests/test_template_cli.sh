#!/usr/bin/env bash
# test_template_cli.sh - `forge template`: byte-exact output (no newline added), the shared
# reference cases through the CLI (when jq is installed), --model with a file that has no
# template (built-in fallback), --chat-template, and clear errors for bad messages/templates.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

printf '%s' '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \u00e9"}]' >"$tmp/m.json"
printf '%s\n' '{%- for m in messages %}' '<{{ m.role }}>{{ m.content | trim }}' '{%- endfor %}' \
    '{% if add_generation_prompt %}<assistant>{% endif %}{{ bos_token }}|{{ eos_token }}' >"$tmp/t.jinja"

"$FORGE" template --template "$tmp/t.jinja" --messages "$tmp/m.json" --add-generation-prompt \
    --bos B --eos E >"$tmp/out" 2>"$tmp/err"
printf '<system>Be brief.<user>Hi \xc3\xa9<assistant>B|E' >"$tmp/want"
tu_check "byte-exact rendering" cmp -s "$tmp/out" "$tmp/want"

"$FORGE" template --template "$tmp/t.jinja" --messages - <"$tmp/m.json" >"$tmp/out" 2>&1
printf '<system>Be brief.<user>Hi \xc3\xa9|' >"$tmp/want"
tu_check "messages from stdin, no generation prompt, undefined bos/eos print empty" cmp -s "$tmp/out" "$tmp/want"

"$FORGE" template --chat-template chatml --messages "$tmp/m.json" --add-generation-prompt >"$tmp/out"
printf '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi \xc3\xa9<|im_end|>\n<|im_start|>assistant\n' >"$tmp/want"
tu_check "built-in chatml" cmp -s "$tmp/out" "$tmp/want"

n=$("$FORGE" template --list | wc -l)
tu_check "--list names the built-ins" test "$n" -ge 5

# errors: clear message, non-zero exit, nothing on stdout
check_error() { # NAME EXPECTED_TEXT ARGS...
    local name=$1 want=$2; shift 2
    if "$FORGE" template "$@" >"$tmp/out" 2>"$tmp/err"; then tu_fail "$name" "exit status 0"; return; fi
    if ! grep -qF -- "$want" "$tmp/err"; then tu_fail "$name" "stderr: $(head -c 300 "$tmp/err")"; return; fi
    if [ -s "$tmp/out" ]; then tu_fail "$name" "wrote to stdout"; return; fi
    tu_ok "$name"
}
printf 'not json' >"$tmp/bad1.json"
check_error "messages not JSON" "not valid JSON" --template "$tmp/t.jinja" --messages "$tmp/bad1.json"
printf '[{"role": "user"}]' >"$tmp/bad2.json"
check_error "message without content" 'messages[0]: missing "content"' --template "$tmp/t.jinja" --messages "$tmp/bad2.json"
printf '[{"content": "x"}]' >"$tmp/bad3.json"
check_error "message without role" 'messages[0]: missing "role"' --template "$tmp/t.jinja" --messages "$tmp/bad3.json"
printf 'a\n{%% if x %%}\nb' >"$tmp/bad.jinja"
check_error "template syntax error names the line" "line 3" --template "$tmp/bad.jinja" --messages "$tmp/m.json"
printf 'x\n{{ raise_exception("no system role") }}' >"$tmp/raise.jinja"
check_error "raise_exception message and line" "line 2: TemplateError: no system role" --template "$tmp/raise.jinja" --messages "$tmp/m.json"
check_error "unknown built-in" "neither a built-in" --chat-template nosuch --messages "$tmp/m.json"
check_error "missing messages file" "cannot read" --template "$tmp/t.jinja" --messages "$tmp/none.json"

# --model: stories260K has no chat template: a built-in is chosen, BOS/EOS come from the vocab
model=$shared/testdata/models/stories260K.gguf
if [ -f "$model" ]; then
    if "$FORGE" template --model "$model" --messages "$tmp/m.json" >"$tmp/out" 2>"$tmp/err" &&
        grep -q '^<s>\[INST\] <<SYS>>' "$tmp/out"; then
        tu_ok "--model without a template uses a built-in with the model's BOS"
    else
        tu_fail "--model without a template uses a built-in with the model's BOS" "$(head -c 300 "$tmp/out" "$tmp/err")"
    fi
    "$FORGE" template --model "$model" --chat-template "$tmp/t.jinja" --messages "$tmp/m.json" >"$tmp/out"
    printf '<system>Be brief.<user>Hi \xc3\xa9<s>|</s>' >"$tmp/want"
    tu_check "--chat-template FILE overrides the model's, tokens from the model" cmp -s "$tmp/out" "$tmp/want"
else
    tu_skip "--model" "$model is absent"
fi

# the shared reference cases through the CLI
dir=$shared/testdata/chat-templates
if [ -d "$dir" ] && command -v jq >/dev/null; then
    pass=0 fail=0
    for j in "$dir"/*.json; do
        tf=$(jq -r 'if type == "object" then .template_file // empty else empty end' "$j") || continue
        [ -n "$tf" ] || continue
        n=$(jq '.cases | length' "$j")
        for ((k = 0; k < n; k++)); do
            jq -c ".cases[$k].messages" "$j" >"$tmp/cm.json"
            args=(--template "$dir/$tf" --messages "$tmp/cm.json" --now 1768435200)
            [ "$(jq ".cases[$k].add_generation_prompt" "$j")" = true ] && args+=(--add-generation-prompt)
            bos=$(jq -r ".cases[$k].bos_token // empty" "$j"); [ -n "$bos" ] && args+=(--bos "$bos")
            eos=$(jq -r ".cases[$k].eos_token // empty" "$j"); [ -n "$eos" ] && args+=(--eos "$eos")
            if [ "$(jq ".cases[$k] | has(\"expected_output\")" "$j")" = true ]; then
                jq -j ".cases[$k].expected_output" "$j" >"$tmp/want"
                if "$FORGE" template "${args[@]}" >"$tmp/out" 2>/dev/null && cmp -s "$tmp/out" "$tmp/want"; then
                    pass=$((pass + 1))
                else fail=$((fail + 1)); echo "  differs: $tf $(jq -r ".cases[$k].name" "$j")"; fi
            else
                want=$(jq -r ".cases[$k].expected_error" "$j")
                if ! "$FORGE" template "${args[@]}" >/dev/null 2>"$tmp/err" && grep -qF -- "$want" "$tmp/err"; then
                    pass=$((pass + 1))
                else fail=$((fail + 1)); echo "  no expected error: $tf"; fi
            fi
        done
    done
    echo "  shared reference cases through the CLI: $pass passed, $fail failed"
    tu_check "shared reference cases through the CLI ($pass)" test "$fail" -eq 0 -a "$pass" -gt 0
else
    tu_skip "shared reference cases through the CLI" "$dir or jq is absent"
fi
tu_done
