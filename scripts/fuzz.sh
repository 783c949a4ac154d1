#!/usr/bin/env bash
# fuzz.sh SECONDS [TARGET...] - run each libFuzzer target in build-fuzz/ for SECONDS, seeded from
# fuzz/seeds/<target>/ (and ../shared where a target's seed script says so). Non-zero on a crash.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}; shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=($(ls build-fuzz/ 2>/dev/null | grep '^fuzz_' | grep -v '\.'))
status=0
for t in "${targets[@]}"; do
    corpus=$(mktemp -d)
    [ -d "fuzz/seeds/$t" ] && cp -r "fuzz/seeds/$t/." "$corpus/"
    [ -x "fuzz/seeds/$t.sh" ] && bash "fuzz/seeds/$t.sh" "$corpus"
    echo "=== $t for ${secs}s"
    if ! build-fuzz/"$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
            -artifact_prefix="build-fuzz/$t-" "$corpus" 2>&1 | grep -E '^(#[0-9]+ +DONE|Done|==|SUMMARY|ERROR)' ; then :; fi
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then echo "fuzz target $t FAILED (exit $rc)"; status=1; else echo "fuzz target $t: ok"; fi
    rm -rf "$corpus"
done
exit $status
