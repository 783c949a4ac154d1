#!/usr/bin/env bash
# test_install.sh - `make install PREFIX=tmp` puts forge, libforge.a, libforge.so (SONAME
# libforge.so.0), the headers, the demo model and forge.pc in place; a C program builds against
# the installed tree with `pkg-config --cflags --libs forge` (shared, and static through
# --static), loads the model and prints checkable facts; the installed forge runs the demo model
# without -m and finds PREFIX/lib/libforge_cuda.so; `make uninstall` removes every file.
# Uses the build the suite runs with ($BUILD: build or build-san) so nothing is rebuilt.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-$(basename "$(dirname "$FORGE")")}
san=0
case "$build" in *san*) san=1 ;; esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
unset MAKEFLAGS MFLAGS MAKELEVEL # a sub-make of `make test`: decide SAN/BUILD here
mk() { make -s -C "$root" SAN=$san BUILD="$build" PREFIX="$prefix" "$@"; }

# a stand-in GPU library (not a Forge one: it has no forge_gpu_get_api) to check where the
# installed forge looks for libforge_cuda.so
printf 'int forge_not_the_gpu_api(void) { return 1; }\n' >"$tmp/fake.c"
cc -shared -fPIC -o "$tmp/libforge_cuda.so" "$tmp/fake.c"

mk install GPU_LIB="$tmp/libforge_cuda.so" >"$tmp/log" 2>&1
rc=$?
tu_check "make install: exit 0" [ $rc -eq 0 ]
[ $rc -eq 0 ] || cat "$tmp/log"
for f in bin/forge lib/libforge.a lib/libforge.so.0.1.0 lib/libforge.so.0 lib/libforge.so \
         lib/libforge_cuda.so lib/pkgconfig/forge.pc include/forge.h include/forge_hub.h \
         include/forge_gguf.h share/forge/stories260K.gguf share/forge/README.md; do
    tu_check "installed $f" [ -e "$prefix/$f" ]
done
tu_check "SONAME libforge.so.0" bash -c "readelf -d '$prefix/lib/libforge.so.0.1.0' | grep -q 'SONAME.*\\[libforge.so.0\\]'"
tu_check "libforge.so -> libforge.so.0" [ "$(readlink "$prefix/lib/libforge.so")" = libforge.so.0 ]
tu_check "forge.pc: prefix and private deps" bash -c "grep -qx 'prefix=$prefix' '$prefix/lib/pkgconfig/forge.pc' && grep -q '^Requires.private: libpcre2-8 libcjson libutf8proc' '$prefix/lib/pkgconfig/forge.pc' && grep -q '^Libs.private: -lcurl -lm -lpthread' '$prefix/lib/pkgconfig/forge.pc'"

# a consumer program: load the installed demo model, tokenize, one greedy step
cat >"$tmp/consumer.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <forge.h>
int main(int argc, char **argv)
{
    forge_err err = {0};
    forge_model *m = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    if (forge_model_load(argv[1], &m, &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    const forge_model_info *info = forge_model_info_get(m);
    if (forge_tok_encode(forge_model_tok(m), "Once upon a time", 16, true, false, &ids, &n, &err)) {
        fprintf(stderr, "%s\n", err.msg); return 1;
    }
    printf("forge %s arch=%s n_vocab=%d n_layer=%d tokens=%zu\n", forge_version(), info->arch,
           info->n_vocab, info->n_layer, n);
    free(ids);
    forge_model_free(m);
    return argc == 2 ? 0 : 1;
}
EOF
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
sanflags=()
[ $san -eq 1 ] && sanflags=(-fsanitize=address,undefined)
want="forge 0.1.0 arch=llama n_vocab=512 n_layer=5 tokens=5"
if cc "${sanflags[@]}" -o "$tmp/consumer" "$tmp/consumer.c" $(pkg-config --cflags --libs forge) 2>"$tmp/cc.err"; then
    tu_ok "pkg-config consumer compiles (shared)"
    out=$(LD_LIBRARY_PATH=$prefix/lib "$tmp/consumer" "$prefix/share/forge/stories260K.gguf" 2>&1)
    tu_check "consumer (shared) runs: '$out'" [ "$out" = "$want" ]
    tu_check "consumer links libforge.so.0" bash -c "LD_LIBRARY_PATH='$prefix/lib' ldd '$tmp/consumer' | grep -q 'libforge.so.0 => $prefix/lib/libforge.so.0'"
else
    tu_fail "pkg-config consumer compiles (shared)" "$(head -c 600 "$tmp/cc.err")"
fi
static_libs=$(pkg-config --static --libs forge | sed 's/-lforge\b/-l:libforge.a/')
if cc "${sanflags[@]}" -o "$tmp/consumer_static" "$tmp/consumer.c" $(pkg-config --cflags forge) $static_libs 2>"$tmp/cc.err"; then
    tu_ok "pkg-config --static consumer compiles"
    out=$("$tmp/consumer_static" "$prefix/share/forge/stories260K.gguf" 2>&1)
    tu_check "consumer (static libforge) runs" [ "$out" = "$want" ]
    tu_check "static consumer needs no libforge.so" bash -c "! ldd '$tmp/consumer_static' | grep -q libforge"
else
    tu_fail "pkg-config --static consumer compiles" "$(head -c 600 "$tmp/cc.err")"
fi

# the installed forge: demo model from PREFIX/share/forge without -m; GPU library from PREFIX/lib
cp -r "$prefix" "$tmp/moved" # relocatable: the lookups are relative to the executable
"$tmp/moved/bin/forge" run -p "Once upon a time" -n 8 --temp 0 -t 1 --device cpu >"$tmp/out" 2>"$tmp/err"
tu_check "installed forge run without -m: exit 0" [ $? -eq 0 ]
tu_check "installed forge uses PREFIX/share/forge" grep -q "bundled demo model $tmp/moved/share/forge/stories260K.gguf" "$tmp/err"
tu_check "installed forge generates text" grep -q "there was" "$tmp/out"
if [ $san -eq 0 ]; then
    "$prefix/bin/forge" run -p x -n 1 -t 1 --device gpu >"$tmp/out" 2>"$tmp/err"
    tu_check "installed forge dlopens PREFIX/lib/libforge_cuda.so" grep -q "libforge_cuda.so is not a Forge GPU library" "$tmp/err"
else
    # ASan intercepts dlopen, so the search runs as libasan's, without forge's RUNPATH
    tu_skip "installed forge dlopens PREFIX/lib/libforge_cuda.so" "checked in the release run: ASan's dlopen ignores the RUNPATH"
fi

mk uninstall GPU_LIB="$tmp/libforge_cuda.so" >"$tmp/log" 2>&1
tu_check "make uninstall: exit 0" [ $? -eq 0 ]
left=$(find "$prefix" ! -type d)
tu_check "make uninstall leaves no file behind" [ -z "$left" ]
[ -z "$left" ] || echo "left: $left"

tu_done
