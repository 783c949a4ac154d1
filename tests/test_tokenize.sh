#!/usr/bin/env bash
# test_tokenize.sh - 'forge tokenize' / 'forge detokenize' against llama.cpp's tokenizer suites:
# every case of every testdata/vocab/*.inp, written byte-exact to a file, must print exactly the
# expected .out line with --ids --no-special. Plus stdin/-p input, --parse-special, detokenize.
source "$(dirname "$0")/lib.sh"
V="${FORGE_SHARED:-../shared}/testdata/vocab"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

tu_require "tokenizer suites" "$V"

for name in llama-spm llama-bpe gpt-2 deepseek-coder falcon starcoder; do
    m="$V/ggml-vocab-$name.gguf"
    if [ ! -f "$m" ]; then tu_skip "suite $name" "$m absent"; continue; fi
    rm -f "$tmp"/case.*
    # split the .inp at "\n__ggml_vocab_test__\n", byte-exact, one file per case
    awk -v dir="$tmp" 'BEGIN { RS = "\n__ggml_vocab_test__\n"; n = 0 }
        { f = sprintf("%s/case.%03d", dir, n++); printf "%s", $0 > f; close(f) }' "$m.inp"
    n=0 bad=0
    while IFS= read -r want || [ -n "$want" ]; do
        f=$(printf '%s/case.%03d' "$tmp" "$n")
        [ -f "$f" ] || : > "$f"   # an empty case leaves no record
        got=$("$FORGE" tokenize --ids --no-special -m "$m" -f "$f")
        if [ "$got" != "$want" ]; then
            bad=$((bad + 1))
            echo "  $name case $n: got '$got' want '$want'"
        fi
        n=$((n + 1))
    done < "$m.out"
    if [ "$bad" -eq 0 ] && [ "$n" -eq 46 ]; then tu_ok "suite $name: $n/$n cases"; else tu_fail "suite $name" "$bad of $n cases differ"; fi
done

spm="$V/ggml-vocab-llama-spm.gguf"
bpe="$V/ggml-vocab-llama-bpe.gguf"
# input is byte-exact: a trailing newline is a token, stdin and -p agree with -f
printf 'Hello world' > "$tmp/a"
printf 'Hello world\n' > "$tmp/b"
tu_check "-p equals -f" test "$("$FORGE" tokenize --ids -m "$spm" -p 'Hello world')" = "$("$FORGE" tokenize --ids -m "$spm" -f "$tmp/a")"
tu_check "stdin equals -f" test "$("$FORGE" tokenize --ids -m "$spm" < "$tmp/b")" = "$("$FORGE" tokenize --ids -m "$spm" -f "$tmp/b")"
tu_check "trailing newline kept" test "$("$FORGE" tokenize --ids -m "$spm" -f "$tmp/a")" != "$("$FORGE" tokenize --ids -m "$spm" -f "$tmp/b")"
tu_check "SPM adds BOS" test "$("$FORGE" tokenize --ids -m "$spm" -p 'Hello world')" = " 1 15043 3186"
tu_check "--no-special" test "$("$FORGE" tokenize --ids --no-special -m "$spm" -p 'Hello world')" = " 15043 3186"
tu_check "llama-bpe adds BOS" test "$("$FORGE" tokenize --ids -m "$bpe" -p 'Hello world')" = " 128000 9906 1917"
tu_check "--parse-special" test "$("$FORGE" tokenize --ids --no-special --parse-special -m "$bpe" -p '<|eot_id|>')" = " 128009"
tu_check "special text stays text" test "$("$FORGE" tokenize --ids --no-special -m "$bpe" -p '<|eot_id|>' | wc -w)" -gt 1
tu_check "pieces listed" bash -c "'$FORGE' tokenize -m '$spm' -p 'Hello world' | grep -q \"15043 -> ' Hello'\""

# detokenize: ids back to the exact text
tu_check "detokenize SPM" test "$("$FORGE" detokenize -m "$spm" --strip-space 15043 3186)" = "Hello world"
tu_check "detokenize special" test "$("$FORGE" detokenize -m "$bpe" --special 128000 9906 1917)" = "<|begin_of_text|>Hello world"
tu_check "detokenize from stdin" test "$(echo '[9906, 1917]' | "$FORGE" detokenize -m "$bpe")" = "Hello world"
printf 'x = {"a": [1, 2]}\n\tcode  \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\xa6\x99\n' > "$tmp/c"
ids=$("$FORGE" tokenize --ids --no-special -m "$bpe" -f "$tmp/c")
"$FORGE" detokenize -m "$bpe" $ids > "$tmp/c.out"
tu_check "round trip through the CLI" cmp -s "$tmp/c" "$tmp/c.out"

# errors
tu_check "bad id is an error" bash -c "! '$FORGE' detokenize -m '$spm' 99999999 2>/dev/null"
tu_check "missing model is an error" bash -c "! '$FORGE' tokenize -m '$tmp/nope.gguf' -p x 2>/dev/null"
tu_check "usage error" bash -c "'$FORGE' tokenize -p x >/dev/null 2>&1; test \$? -eq 2"
tu_done
