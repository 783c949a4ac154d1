#!/usr/bin/env bash
# fuzz.sh SECONDS [TARGET...] - run each libFuzzer target in build-fuzz/ for SECONDS, seeded from
# fuzz/seeds/<target>/ (and ../shared where a target's seed script says so). Non-zero on a crash
# or a timeout. An input may take at most 10 s (fuzz_template: 2 s, as the renderer's own
# wall-clock budget must end any render long before that).
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}; shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=($(ls build-fuzz/ 2>/dev/null | grep '^fuzz_' | grep -v '\.'))
status=0
for t in "${targets[@]}"; do
    corpus=$(mktemp -d)
    log=$(mktemp)
    [ -d "fuzz/seeds/$t" ] && cp -r "fuzz/seeds/$t/." "$corpus/"
    [ -x "fuzz/seeds/$t.sh" ] && bash "fuzz/seeds/$t.sh" "$corpus"
    timeout=10
    [ "$t" = fuzz_template ] && timeout=2
    echo "=== $t for ${secs}s (-timeout=$timeout)"
    build-fuzz/"$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout="$timeout" -print_final_stats=1 \
        -artifact_prefix="build-fuzz/$t-" "$corpus" >"$log" 2>&1
    rc=$?
    grep -E '^(#[0-9]+[[:space:]]+DONE|Done|==|SUMMARY|ERROR|stat::)' "$log"
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log"
        echo "fuzz target $t FAILED (exit $rc)"; status=1
    else
        echo "fuzz target $t: ok"
    fi
    rm -rf "$corpus" "$log"
done
exit $status
