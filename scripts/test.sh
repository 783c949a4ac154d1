#!/usr/bin/env bash
# test.sh - the README's second command (and what CI runs): install what is missing, build, run the
# whole test suite in release and under ASan+UBSan, and run every fuzz target for a while.
#   FUZZ_SECONDS (default 60): seconds per fuzz target; 0 skips fuzzing.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh || exit 1
jobs=$(nproc)
status=0

echo "### release build + tests"
make -j"$jobs" all || exit 1
make test || status=1

echo "### ASan + UBSan build + tests"
make -j"$jobs" SAN=1 all || exit 1
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    make SAN=1 test || status=1

if [ -f scripts/gpu-build-check.sh ]; then
    echo "### GPU code: compile with nvcc (CUDA) and ROCm clang (HIP)"
    bash scripts/gpu-build-check.sh || status=1
fi

fuzz_s=${FUZZ_SECONDS:-60}
if [ "$fuzz_s" -gt 0 ]; then
    echo "### fuzzing (${fuzz_s}s per target)"
    make -j"$jobs" fuzz || exit 1
    bash scripts/fuzz.sh "$fuzz_s" || status=1
fi
exit $status
