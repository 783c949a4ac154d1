#!/usr/bin/env bash
# test_demo_fresh.sh - the README's first command on a fresh clone with no ../shared beside it:
# the repository's files (git ls-files: tracked + new, not ignored) are copied into a temporary
# directory whose parent has no `shared`, and `bash scripts/demo.sh` must generate text with the
# bundled model. The release run ($BUILD=build) lets demo.sh build forge in the copy (make
# -j$(nproc), about a minute on 2 cores); other runs (build-san) point it at the suite's forge
# (FORGE_DEMO_BIN) so the build is not repeated.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-$(basename "$(dirname "$FORGE")")}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset MAKEFLAGS MFLAGS MAKELEVEL FORGE_MODEL

clone=$tmp/fresh/forge
mkdir -p "$clone"
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        xargs -0 cp --parents -t "$clone")
else
    (cd "$root" && tar --exclude='./build*' --exclude=./.git -cf - .) | tar -xf - -C "$clone"
fi
tu_check "copy has the bundled model" [ -f "$clone/models/stories260K.gguf" ]
tu_check "no shared/ beside the copy" [ ! -e "$tmp/fresh/shared" ]
tu_check "copy has no build output" [ ! -e "$clone/build" ]

if [ "$build" = build ]; then
    (cd "$tmp" && timeout 900 bash "$clone/scripts/demo.sh") >"$tmp/out" 2>"$tmp/err"
else
    (cd "$tmp" && FORGE_DEMO_BIN=$FORGE timeout 300 bash "$clone/scripts/demo.sh") >"$tmp/out" 2>"$tmp/err"
fi
rc=$?
tu_check "demo.sh exits 0" [ $rc -eq 0 ]
[ $rc -eq 0 ] || tail -20 "$tmp/err"
tu_check "demo prints the prompt and a story" bash -c "head -c 16 '$tmp/out' | grep -qx 'Once upon a time' && [ \$(wc -w <'$tmp/out') -gt 40 ]"
tu_check "demo used the bundled model" grep -q "loaded models/stories260K.gguf" "$tmp/err"
[ "$build" = build ] && tu_check "demo built forge in the copy" [ -x "$clone/build/forge" ]

# forge run without -m in the copy finds models/ next to its build tree
if [ -x "$clone/build/forge" ]; then
    "$clone/build/forge" run -p "Once upon a time" -n 8 -t 1 >"$tmp/out" 2>"$tmp/err"
    tu_check "copy's forge run without -m: bundled model" grep -q "bundled demo model $clone/models/stories260K.gguf" "$tmp/err"
fi
# forge run without -m and without the bundled model: a clear usage error
mkdir -p "$tmp/lone/bin"
cp "$FORGE" "$tmp/lone/bin/forge"
"$tmp/lone/bin/forge" run -p x >/dev/null 2>"$tmp/err"
tu_check "no model anywhere: exit 2" [ $? -eq 2 ]
tu_check "no model anywhere: says what was looked for" grep -q "FORGE_MODEL is not set and the bundled demo model" "$tmp/err"
FORGE_MODEL=$root/models/stories260K.gguf "$tmp/lone/bin/forge" run -p "Once upon a time" -n 4 -t 1 >/dev/null 2>"$tmp/err"
tu_check "FORGE_MODEL is used when set" grep -q "loaded $root/models/stories260K.gguf" "$tmp/err"

tu_done
