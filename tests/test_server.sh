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

# Bad command lines: exit 2 naming the option, exit 1 naming the file or address
model=$FORGE_SHARED/testdata/models/stories260K.gguf
cli_case() { # NAME WANT_STATUS WANT_TEXT ARGS...
    local name=$1 want=$2 text=$3 out rc
    shift 3
    out=$(timeout 20 "$FORGE" serve "$@" 2>&1 >/dev/null); rc=$?
    if [ "$rc" -eq "$want" ] && grep -qF -- "$text" <<<"$out"; then tu_ok "$name"
    else tu_fail "$name" "exit $rc, stderr: $(head -c 300 <<<"$out")"; fi
}
cli_case "serve: no model is a usage error" 2 "-m MODEL" --port 0
cli_case "serve: bad --port" 2 "--port" -m "$model" --port 70000
cli_case "serve: bad --max-body" 2 "--max-body" -m "$model" --max-body 1
cli_case "serve: unknown option" 2 "--frobnicate" -m "$model" --frobnicate 1
cli_case "serve: both key options" 2 "not both" -m "$model" --api-key k --api-key-file /dev/null
cli_case "serve: missing model file" 1 "nope.gguf" -m "$TEST_OUT/nope.gguf" --port 0
cli_case "serve: missing key file" 1 "nokey" -m "$model" --api-key-file "$TEST_OUT/nokey" --port 0
cli_case "serve: bad --host" 1 "--host" -m "$model" --host no.such.host.invalid --port 0 --device cpu
port_taken() {
    local log="$TEST_OUT/port-server.log" port="" pid rc i
    "$FORGE" serve -m "$model" --port 0 --device cpu -t 1 2>"$log" &
    pid=$!
    for i in $(seq 100); do
        port=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$log" | sed 's/.*://')
        [ -n "$port" ] && break
        sleep 0.1
    done
    timeout 20 "$FORGE" serve -m "$model" --port "$port" --device cpu -t 1 2>"$log.2"; rc=$?
    kill -TERM "$pid"; wait "$pid"
    [ -n "$port" ] && [ "$rc" -eq 1 ] && grep -q "cannot listen on 127.0.0.1:$port" "$log.2"
}
tu_check "serve: a port in use is an error naming it" port_taken

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
