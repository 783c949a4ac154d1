#!/usr/bin/env bash
# run-tests.sh BUILD_DIR - run every test program in BUILD_DIR/tests (cmocka binaries) and every
# tests/test_*.sh script (CLI tests; they get $FORGE), from the repository root. Prints each
# program's output and, last, one line "N passed, N failed" counting individual test cases.
set -u
build=${1:-build}
cd "$(dirname "$0")/.."
export FORGE=${FORGE:-$PWD/$build/forge}
export FORGE_SHARED=${FORGE_SHARED:-$(cd .. && pwd)/shared}
export CMOCKA_MESSAGE_OUTPUT=stdout
passed=0 failed=0 skipped=0 bad_programs=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for t in "$build"/tests/test_* tests/test_*.sh; do
    [ -e "$t" ] || continue
    case "$t" in *.o|*.d) continue ;; esac
    echo "=== $t"
    if [[ "$t" == *.sh ]]; then cmd=(bash "$t"); else cmd=("$t"); fi
    "${cmd[@]}" >"$log" 2>&1
    rc=$?
    cat "$log"
    # cmocka: "[  PASSED  ] N test(s)." / "[  FAILED  ] N test(s), listed below:" / "[  SKIPPED ] N"
    # shell tests print the same markers through tests/lib.sh.
    p=$(grep -Eo '^\[  PASSED  \] [0-9]+' "$log" | awk '{s+=$NF} END {print s+0}')
    f=$(grep -Eo '^\[  FAILED  \] [0-9]+' "$log" | awk '{s+=$NF} END {print s+0}')
    s=$(grep -Eo '^\[  SKIPPED \] [0-9]+' "$log" | awk '{s+=$NF} END {print s+0}')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi   # crashed or failed outside a test case
    if [ "$rc" -ne 0 ]; then bad_programs+=("$t (exit $rc)"); fi
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
done

if [ ${#bad_programs[@]} -gt 0 ]; then
    echo "failing programs:"; printf '  %s\n' "${bad_programs[@]}"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
