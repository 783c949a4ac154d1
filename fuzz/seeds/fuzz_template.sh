#!/usr/bin/env bash
# fuzz_template.sh CORPUS_DIR - add the real chat templates from ../shared (third-party data, so
# they are not copied into the repository) to the fuzzing corpus when they are present.
corpus=$1
shared=${FORGE_SHARED:-$(dirname "$0")/../../../shared}
dir="$shared/testdata/chat-templates"
[ -d "$dir" ] || exit 0
for f in "$dir"/*.jinja; do
    [ -f "$f" ] && cp "$f" "$corpus/shared-$(basename "$f")"
done
exit 0
