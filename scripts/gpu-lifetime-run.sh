#!/usr/bin/env bash
# gpu-lifetime-run.sh - the GPU lifetime tests of issue 10 on the GPU machine, logs to $OUT:
#   1. test_gpu_free_race with the real library: must pass; with the GPU_BROKEN_FREE=1 library
#      (frees at once instead of in stream order): must FAIL (the test catches the bug class)
#   2. test_gpu_lifetime (two contexts on one model, interrupt + free loop, aliasing, shared
#      memory fallback, BLAS failure warning)
#   3. compute-sanitizer memcheck (--leak-check full) over both with the real library: 0 errors
# Usage: bash scripts/gpu-lifetime-run.sh GOOD BROKEN FIXTURES
#   GOOD, BROKEN: build dirs (libforge_cuda.so + tests/gpu/*) of `make gpu` and of
#   `make BUILD=build-broken GPU_BROKEN_FREE=1 gpu`; FIXTURES: shared/testdata/... and lib/.
# Prints one line per step; exit 1 when a step did not give the expected result.
set -uo pipefail
G=${1:-.dev/gpu-lt/good}
BR=${2:-.dev/gpu-lt/broken}
FX=${3:-.dev/fx}
OUT=${OUT:-/tmp/gpu-lifetime-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$FX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FORGE_SHARED="$PWD/$FX/shared"
if ldd "$G/libforge_cuda.so" | grep -q "not found"; then
    d=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null)
    [ -n "$d" ] && export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
fi
CS=compute-sanitizer
command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
bad=0
step() { # NAME EXPECT(pass|fail) TIMEOUT CMD...
    local name=$1 want=$2 to=$3
    shift 3
    local t0=$SECONDS
    timeout "$to" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local got=pass
    [ $rc -ne 0 ] && got=fail
    local verdict=ok
    [ "$got" != "$want" ] && verdict=UNEXPECTED && bad=$((bad + 1))
    printf '%-40s rc=%-3d expected %-4s -> %-10s %4ds | %s\n' "$name" $rc "$want" "$verdict" \
        $((SECONDS - t0)) "$(grep -E 'passed|ERROR SUMMARY|LEAK SUMMARY' "$OUT/$name.log" | tail -2 | tr '\n' ' ')"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step free-race-real pass 120 "$G/tests/gpu/test_gpu_free_race"
step free-race-broken fail 120 "$BR/tests/gpu/test_gpu_free_race"
grep -E "free race" "$OUT/free-race-broken.log" | head -8
step lifetime pass 240 "$G/tests/gpu/test_gpu_lifetime"
grep -E "ok$|FAIL|interrupt|warning" "$OUT/lifetime.log" | head -20
export FORGE_GPU_TEST_UNDER_SANITIZER=1
step cs-memcheck-free-race pass 240 $CS --tool memcheck --leak-check full --error-exitcode 9 \
    "$G/tests/gpu/test_gpu_free_race" --quick
step cs-memcheck-free-race-broken fail 240 $CS --tool memcheck --error-exitcode 9 \
    "$BR/tests/gpu/test_gpu_free_race" --quick
step cs-memcheck-lifetime pass 400 $CS --tool memcheck --leak-check full --error-exitcode 9 \
    "$G/tests/gpu/test_gpu_lifetime"
echo "gpu-lifetime: $bad unexpected result(s)"
exit $((bad > 0))
