#!/usr/bin/env bash
# test_server.sh - forge serve end to end: `npm ci` installs the pinned official openai client
# and puppeteer-core (tests/server/package-lock.json), then Node's test runner runs
# tests/server/api.test.mjs (the API through the official client, errors, key, shutdown),
# load.test.mjs (1000 requests, 64 concurrent, disconnects, bad bodies) and browser.test.mjs
# (the chat page in Debian's headless Chromium) against $FORGE serve on stories260K, 127.0.0.1.
# Each node test is one line here. Logs, TAP output and the chat page's screenshot stay in
# $TEST_OUT (default: the build directory's test-output/server/).
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh
tu_require "forge serve" "$FORGE_SHARED/testdata/models/stories260K.gguf"
export TEST_OUT=${TEST_OUT:-$(cd "$(dirname "$FORGE")" && pwd)/test-output/server}
mkdir -p "$TEST_OUT"

# The README's curl examples, as written, against the README's server command (on a free port)
readme_examples() {
    local log="$TEST_OUT/readme-server.log" port="" pid i out ok=0
    cmd=$(sed -n '/^## Serving/,/^## Installing/p' README.md | grep -m1 '^build/forge serve')
    [ -n "$cmd" ] || { echo "no server command in README"; return 1; }
    ${cmd/build\/forge/$FORGE} --port 0 --device cpu -t 1 2>"$log" &
    pid=$!
    for i in $(seq 100); do
        port=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$log" | sed 's/.*://')
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { cat "$log"; kill "$pid"; return 1; }
    while IFS= read -r line; do
        out=$(eval "${line//127.0.0.1:8080/127.0.0.1:$port}") || { echo "failed: $line"; ok=1; continue; }
        case "$line" in
        *v1/completions*) grep -q '"object":"text_completion"' <<<"$out" ;;
        *chat/completions*) grep -q '^data: \[DONE\]' <<<"$out" && grep -q '"delta":{"content"' <<<"$out" ;;
        *v1/models*) grep -q '"id":"stories260K.gguf"' <<<"$out" ;;
        *tokenize*) grep -q '"tokens":\[' <<<"$out" ;;
        *metrics*) grep -q '^forge_requests_total{status="200"}' <<<"$out" ;;
        *) true ;;
        esac || { echo "unexpected output of: $line"; echo "$out" | head -5; ok=1; }
    done < <(sed -n '/^## Serving/,/^## Installing/p' README.md | grep '^curl ')
    kill -TERM "$pid"
    wait "$pid" || { echo "server exited $?"; ok=1; }
    return $ok
}
tu_check "README: forge serve and its curl examples work as written" readme_examples

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    tu_fail "node and npm" "missing (bash scripts/install-deps.sh --test installs them)"
    tu_done; exit 1
fi
if (cd tests/server && npm ci --no-audit --no-fund --loglevel=error) >"$TEST_OUT/npm.log" 2>&1; then
    tu_ok "npm ci (openai, puppeteer-core as pinned)"
else
    tu_fail "npm ci" "$(tail -n 5 "$TEST_OUT/npm.log")"
    tu_done; exit 1
fi

for t in api load browser; do
    if [ "$t" = browser ] && [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
        tu_fail "browser test" "no ${CHROMIUM:-/usr/bin/chromium} (bash scripts/install-deps.sh --test installs Debian's chromium)"
        continue
    fi
    tap="$TEST_OUT/$t.tap"
    start=$(date +%s)
    timeout 600 node --test --test-reporter=tap "tests/server/$t.test.mjs" >"$tap" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    # the tests inside each describe block are indented: one line each
    n_ok=0 n_bad=0
    while IFS= read -r line; do
        if [[ "$line" =~ ^\ \ \ \ (not\ )?ok\ [0-9]+\ -\ (.*)$ ]]; then
            if [ -n "${BASH_REMATCH[1]}" ]; then tu_fail "$t: ${BASH_REMATCH[2]}"; n_bad=$((n_bad + 1))
            else tu_ok "$t: ${BASH_REMATCH[2]}"; n_ok=$((n_ok + 1)); fi
        fi
    done <"$tap"
    grep '^# load:' "$tap" | sed 's/^# /    /'
    echo "    ($t: ${secs}s, TAP in $tap)"
    if [ "$rc" -ne 0 ] || [ "$n_bad" -gt 0 ]; then
        [ "$n_bad" -eq 0 ] && tu_fail "$t" "node --test exited $rc"
        sed -n '1,400p' "$tap" | grep -v '^ *at \|node:internal' | tail -n 120
    elif [ "$n_ok" -eq 0 ]; then
        tu_fail "$t" "no test ran"
    fi
done
[ -f "$TEST_OUT/chat.png" ] && echo "    screenshot: $TEST_OUT/chat.png"
tu_done
