# lib.sh - tiny harness for CLI tests written in bash (source it). Each check prints a line;
# tu_done prints cmocka-style totals that scripts/run-tests.sh counts.
# $FORGE is the forge binary, $FORGE_SHARED the shared test data.
TU_PASS=0 TU_FAIL=0 TU_SKIP=0
tu_ok()   { TU_PASS=$((TU_PASS + 1)); echo "[       OK ] $1"; }
tu_fail() { TU_FAIL=$((TU_FAIL + 1)); echo "[  FAILED  ] $1${2:+: $2}"; }
tu_skip() { TU_SKIP=$((TU_SKIP + 1)); echo "[  SKIPPED ] $1${2:+: $2}"; }
# tu_check NAME CMD... : passes when CMD exits 0
tu_check() { local n=$1; shift; if "$@"; then tu_ok "$n"; else tu_fail "$n"; fi; }
tu_done() {
    echo "[  PASSED  ] $TU_PASS test(s)."
    [ "$TU_SKIP" -gt 0 ] && echo "[  SKIPPED ] $TU_SKIP test(s)."
    [ "$TU_FAIL" -gt 0 ] && echo "[  FAILED  ] $TU_FAIL test(s)."
    [ "$TU_FAIL" -eq 0 ]
}
# tu_require_cmd NAME CMD : when the program CMD is not installed, report the whole script as
# skipped, with the reason, and exit; otherwise return.
tu_require_cmd() {
    if ! command -v "$2" >/dev/null; then
        tu_skip "$1" "$2 not found"
        tu_done
        exit $?
    fi
}
# tu_require NAME PATH... : when a path (shared test data) is missing, report the whole script as
# skipped, with the path, and exit; otherwise return.
tu_require() {
    local n=$1 p; shift
    for p in "$@"; do
        if [ ! -e "$p" ]; then
            tu_skip "$n" "shared test data $p is absent"
            tu_done
            exit $?
        fi
    done
}
