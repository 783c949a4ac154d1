#!/usr/bin/env bash
# test_device.sh - device selection from the command line (--device auto|gpu|cpu, --gpu N,
# FORGE_GPU_LIB). In CI there is no GPU: auto must fall back to the CPU and still produce the
# llama.cpp reference greedy ids, gpu must fail cleanly with a message, and a FORGE_GPU_LIB that
# is not a (Forge GPU) library is a clear error. On a machine with a GPU the same script checks
# that the GPU run reproduces the reference ids instead.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
models=$shared/testdata/models
tsv=$shared/testdata/reference/greedy_summary.tsv
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

tu_require "device selection" "$models/stories260K.gguf" "$tsv"
m=$models/stories260K.gguf
# the reference: first F32-KV row of stories260K.gguf
want=$(awk -F'\t' '$1 == "stories260K.gguf" && $2 == "f32" && $3 == "\"Once upon a time\"" { print $5; exit }' "$tsv")
run_ids() { # run_ids OUT ERR ARGS... ; prints nothing, returns forge's status
    local out=$1 err=$2
    shift 2
    "$FORGE" run -m "$m" -p "Once upon a time" -n 64 --temp 0 --kv-type f32 -t 1 --ids "$@" >"$out" 2>"$err"
}
ids_of() { sed -n 's/^ids: //p' "$1"; }

tu_check "reference ids found" [ -n "$want" ]

# --device cpu: the reference, no note
run_ids "$tmp/o" "$tmp/e" --device cpu
rc=$?
tu_check "--device cpu: exit 0 and reference ids" bash -c "[ $rc -eq 0 ] && [ \"\$(sed -n 's/^ids: //p' '$tmp/o')\" = '$want' ]"
tu_check "--device cpu: no device note" bash -c "! grep -q 'note: running on the CPU' '$tmp/e'"

# Is a GPU usable here? --device gpu decides.
run_ids "$tmp/og" "$tmp/eg" --device gpu
rc_gpu=$?
if [ $rc_gpu -eq 0 ]; then
    tu_ok "--device gpu: a GPU is usable here"
    tu_check "--device gpu: reference ids" [ "$(ids_of "$tmp/og")" = "$want" ]
    run_ids "$tmp/o" "$tmp/e" --device auto
    tu_check "--device auto (GPU present): reference ids" [ "$(ids_of "$tmp/o")" = "$want" ]
else
    tu_check "--device gpu without a GPU: exit 1" [ $rc_gpu -eq 1 ]
    tu_check "--device gpu without a GPU: says why" grep -q "^forge run: --device gpu: ..*" "$tmp/eg"
    tu_check "--device gpu without a GPU: no output" bash -c "[ ! -s '$tmp/og' ]"
    run_ids "$tmp/o" "$tmp/e" --device auto
    rc=$?
    tu_check "--device auto without a GPU: exit 0" [ $rc -eq 0 ]
    tu_check "--device auto without a GPU: reference ids" [ "$(ids_of "$tmp/o")" = "$want" ]
    tu_check "--device auto without a GPU: note on stderr" grep -q "note: running on the CPU (" "$tmp/e"
    # the default is auto: same ids
    run_ids "$tmp/o" "$tmp/e"
    tu_check "default device without a GPU: reference ids" [ "$(ids_of "$tmp/o")" = "$want" ]
fi

# FORGE_GPU_LIB pointing at a file that is not a library
printf 'not a shared library\n' >"$tmp/fake.so"
FORGE_GPU_LIB=$tmp/fake.so run_ids "$tmp/o" "$tmp/e" --device gpu
rc=$?
tu_check "FORGE_GPU_LIB=non-library, --device gpu: exit 1" [ $rc -eq 1 ]
tu_check "FORGE_GPU_LIB=non-library: message names the file" grep -q "cannot load the GPU library $tmp/fake.so (from FORGE_GPU_LIB)" "$tmp/e"
FORGE_GPU_LIB=$tmp/fake.so run_ids "$tmp/o" "$tmp/e" --device auto
rc=$?
tu_check "FORGE_GPU_LIB=non-library, --device auto: CPU, reference ids" bash -c "[ $rc -eq 0 ] && [ \"\$(sed -n 's/^ids: //p' '$tmp/o')\" = '$want' ]"
tu_check "FORGE_GPU_LIB=non-library, --device auto: note names the file" grep -q "note: running on the CPU (cannot load the GPU library $tmp/fake.so" "$tmp/e"

# FORGE_GPU_LIB pointing at a real library that is not Forge's
libm=$(ldconfig -p 2>/dev/null | awk '/libm\.so\.6 .*x86-64|libm\.so\.6 .*AArch64/ { print $NF; exit }')
[ -z "$libm" ] && for f in /lib/x86_64-linux-gnu/libm.so.6 /usr/lib/x86_64-linux-gnu/libm.so.6 /lib/aarch64-linux-gnu/libm.so.6; do [ -f "$f" ] && libm=$f && break; done
if [ -n "$libm" ]; then
    FORGE_GPU_LIB=$libm run_ids "$tmp/o" "$tmp/e" --device gpu
    rc=$?
    tu_check "FORGE_GPU_LIB=libm: exit 1, not a Forge GPU library" bash -c "[ $rc -eq 1 ] && grep -q 'is not a Forge GPU library' '$tmp/e'"
else
    tu_skip "FORGE_GPU_LIB=libm" "no libm.so.6 found"
fi
# a missing file
FORGE_GPU_LIB=$tmp/absent.so run_ids "$tmp/o" "$tmp/e" --device gpu
tu_check "FORGE_GPU_LIB=missing file: exit 1 with its name" bash -c "[ $? -eq 1 ] && grep -q '$tmp/absent.so' '$tmp/e'"

# bad option values
run_ids "$tmp/o" "$tmp/e" --device tpu
tu_check "--device tpu: rejected" bash -c "[ $? -ne 0 ] && grep -q 'auto, gpu or cpu' '$tmp/e'"
run_ids "$tmp/o" "$tmp/e" --gpu -1
tu_check "--gpu -1: rejected" bash -c "[ $? -ne 0 ] && grep -q 'bad value for --gpu' '$tmp/e'"
"$FORGE" run --help >"$tmp/o" 2>&1
tu_check "--help documents --device and --gpu" bash -c "grep -q -- '--device auto|gpu|cpu' '$tmp/o' && grep -q -- '--gpu N' '$tmp/o'"

tu_done
