#!/usr/bin/env bash
# test.sh - the README's second command (and what CI runs): install what is missing, build, run the
# whole test suite in release and under ASan+UBSan, compile the GPU code (CUDA and HIP), and run
# every fuzz target for a while. The last line totals everything: "N passed, N failed".
#   FUZZ_SECONDS (default 60): seconds per fuzz target; 0 skips fuzzing.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --test || exit 1
jobs=$(nproc)
passed=0 failed=0
summary=$(mktemp)
trap 'rm -f "$summary"' EXIT

# count the closing "N passed, N failed" line of one suite run
count_suite() {
    local line p f
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$summary" | tail -n 1)
    p=$(echo "$line" | awk '{print $1+0}')
    f=$(echo "$line" | awk '{print $3+0}')
    [ -z "$line" ] && f=1
    passed=$((passed + p)); failed=$((failed + f))
}
# a step that is one check: compile checks, fuzz runs
step() {
    local name=$1; shift
    if "$@"; then passed=$((passed + 1)); else echo "FAILED: $name"; failed=$((failed + 1)); fi
}

echo "### release build + tests"
make -j"$jobs" all || exit 1
make test 2>&1 | tee "$summary"
count_suite

echo "### ASan + UBSan build + tests"
make -j"$jobs" SAN=1 all || exit 1
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    make SAN=1 test 2>&1 | tee "$summary"
count_suite

if [ -f scripts/gpu-build-check.sh ]; then
    echo "### GPU code: compile with nvcc (CUDA) and ROCm clang (HIP)"
    step "GPU compile checks" bash scripts/gpu-build-check.sh
    # the cases that need the built GPU library (skipped, with the reason, in the runs above)
    if [ -f build/libforge_cuda.so ]; then
        step "GPU library loading without NCCL" env FORGE_SHARED="${FORGE_SHARED:-../shared}" \
            build/tests/test_gpu_comm_load
    fi
fi

fuzz_s=${FUZZ_SECONDS:-60}
if [ "$fuzz_s" -gt 0 ]; then
    echo "### fuzzing (${fuzz_s}s per target)"
    make -j"$jobs" fuzz || exit 1
    for t in $(ls build-fuzz/ | grep -E '^fuzz_[a-z0-9_]+$'); do
        step "fuzz target $t" bash scripts/fuzz.sh "$fuzz_s" "$t"
    done
fi

echo "### total (test cases of both builds, GPU compile check, fuzz targets)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
