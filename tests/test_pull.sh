#!/usr/bin/env bash
# test_pull.sh - `forge pull`, `-hf`, `forge models` end to end against a fake hub on 127.0.0.1
# (tests/hub_server.py: /api/models/REPO, /REPO/resolve/main/FILE -> 302 with X-Linked-Etag /
# X-Linked-Size, ranges): a fresh pull, the sha256 checked, a resume after a dropped connection,
# a corrupted body, 401 without/with HF_TOKEN, an unknown quant, --offline, a non-GGUF body, a
# missing repo/file, a network error, a full disk, a changed file, split files joined,
# concurrent pulls, `forge models` and `models rm`, `run -hf` from the cache.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
shared=${FORGE_SHARED:-../shared}
models=$shared/testdata/models
tu_require "forge pull" "$models/stories260K.gguf" "$models/stories260K-F16.gguf" \
    "$models/stories260K-Q8_0-mix.gguf"
command -v python3 >/dev/null || { tu_fail "forge pull" "python3 is needed for the fake hub"; tu_done; exit 1; }
test_hub=${BUILD:+$BUILD/tests/test_hub}
[ -x "${test_hub:-}" ] || test_hub=$(dirname "$FORGE")/tests/test_hub

tmp=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
export FORGE_CACHE=$tmp/cache
unset HF_TOKEN HF_ENDPOINT FORGE_OFFLINE HF_HUB_OFFLINE FORGE_MODEL
T="timeout 60"

# the files the hub serves
src=$tmp/src
mkdir -p "$src"
cp "$models/stories260K.gguf" "$src/F32.gguf"
cp "$models/stories260K-F16.gguf" "$src/F16.gguf"
cp "$models/stories260K-Q8_0-mix.gguf" "$src/Q8.gguf"
printf 'this is an HTML error page, not a model\n%.0s' $(seq 100) >"$src/notgguf.gguf"
head -c 4000 "$models/stories260K.gguf" >"$src/truncated.gguf" # GGUF magic, cut short
split_ok=0
if [ -x "$test_hub" ] && "$test_hub" --split "$src/F32.gguf" "$src/split" 3; then split_ok=1; fi

write_config() { # $1: JSON for the stories repo's file options (merged by python)
    python3 - "$tmp/config.json" "$src" "${1:-{\}}" <<'EOF'
import json, sys
out, src, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
files = {"stories260K-F32.gguf": {"path": src + "/F32.gguf"},
         "stories260K-F16.gguf": {"path": src + "/F16.gguf"},
         "stories260K-Q8_0.gguf": {"path": src + "/Q8.gguf"}}
import os
if os.path.exists(src + "/split-00001-of-00003.gguf"):
    for k in (1, 2, 3):
        files["Q4_0/stories260K-Q4_0-%05d-of-00003.gguf" % k] = {"path": src + "/split-%05d-of-00003.gguf" % k}
for name, o in opts.items():
    files.setdefault(name, {"path": src + "/F32.gguf"}).update(o)
cfg = {"repos": {"test/stories-GGUF": {"files": files},
                 "test/gated-GGUF": {"token": "s3cret", "files": {"gated-Q8_0.gguf": {"path": src + "/Q8.gguf"}}},
                 "test/broken-GGUF": {"files": {"broken-Q4_0.gguf": {"path": src + "/notgguf.gguf"},
                                                "broken-Q5_0.gguf": {"path": src + "/truncated.gguf"}}}}}
json.dump(cfg, open(out + ".tmp", "w"))
os.rename(out + ".tmp", out)
EOF
}
write_config
python3 "$(dirname "$0")/hub_server.py" "$tmp/config.json" "$tmp/port" "$tmp/log" 2>>"$tmp/server.err" &
server_pid=$!
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.1; done
if [ ! -s "$tmp/port" ]; then tu_fail "fake hub started"; tu_done; exit 1; fi
export HF_ENDPOINT=http://127.0.0.1:$(cat "$tmp/port")
repo=$FORGE_CACHE/hub/test/stories-GGUF
sha() { sha256sum "$1" | cut -d' ' -f1; }
no_gguf_left() { # nothing but the named files under the cache's repo dir (and no .part/.new)
    [ -z "$(find "$FORGE_CACHE" -name '*.part' -o -name '*.new' -o -name '*.joining' 2>/dev/null)" ]
}

# 1. a fresh pull: the path on stdout, the bytes and sha256 of the served file, the redirect
$T "$FORGE" pull test/stories-GGUF:f32 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "pull: exit 0" [ $rc -eq 0 ]
tu_check "pull: prints the cached path" [ "$(cat "$tmp/out")" = "$repo/stories260K-F32.gguf" ]
tu_check "pull: same sha256 as served" [ "$(sha "$repo/stories260K-F32.gguf")" = "$(sha "$src/F32.gguf")" ]
tu_check "pull: asked the API, followed the redirect" \
    bash -c "grep -q '^GET /api/models/test/stories-GGUF ' '$tmp/log' && grep -q '^GET /cdn/test/stories-GGUF/stories260K-F32.gguf ' '$tmp/log'"
tu_check "pull: no token sent when HF_TOKEN is unset" bash -c "! grep -q 'auth=yes' '$tmp/log'"

# 1b. a progress bar on a terminal (script(1) gives forge a pty), none when stderr is a file;
#     a file name with a space and a '+' is percent-encoded in the URL
write_config '{"odd name+x-Q2_K.gguf": {}}'
if command -v script >/dev/null; then
    HF_ENDPOINT=$HF_ENDPOINT FORGE_CACHE=$FORGE_CACHE $T script -qec "'$FORGE' pull test/stories-GGUF:Q2_K" /dev/null >"$tmp/tty" 2>&1
    tu_check "progress bar on a terminal" grep -q "odd name+x-Q2_K.gguf \[#*\] 100%" "$tmp/tty"
else
    tu_fail "progress bar on a terminal" "script(1) (bsdutils) is missing"
fi
tu_check "encoded file name in the URL" grep -q "^GET /odd%20name%2Bx-Q2_K.gguf\|resolve/main/odd%20name%2Bx-Q2_K.gguf" "$tmp/log"
tu_check "odd name cached" [ -f "$repo/odd name+x-Q2_K.gguf" ]
tu_check "no progress bar when stderr is not a terminal" bash -c "! grep -q '\[#' '$tmp/err'"
"$FORGE" models rm "test/stories-GGUF/odd name+x-Q2_K.gguf" >/dev/null
write_config

# 2. pulling again: up to date (a HEAD for the sha256, no new body)
: >"$tmp/log"
$T "$FORGE" pull test/stories-GGUF:F32 >"$tmp/out" 2>"$tmp/err"
tu_check "pull again: up to date, no download" \
    bash -c "grep -q 'up to date' '$tmp/err' && ! grep -q '^GET /cdn/' '$tmp/log'"

# 3. the connection dropped halfway (twice): the retries resume with a Range, the sha256 matches
write_config '{"stories260K-F16.gguf": {"drop": 2}}'
: >"$tmp/log"
$T "$FORGE" pull test/stories-GGUF:F16 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "dropped connection: pull succeeds by resuming" [ $rc -eq 0 ]
tu_check "dropped connection: resumed with Range: bytes=N-" grep -Eq '^GET /cdn/.*F16.gguf range=bytes=[1-9][0-9]*-' "$tmp/log"
tu_check "dropped connection: sha256 of the joined bytes" [ "$(sha "$repo/stories260K-F16.gguf")" = "$(sha "$src/F16.gguf")" ]
tu_check "dropped connection: said it resumed" grep -q "resuming" "$tmp/err"

# 4. a dropped connection with no retries left: exit 1, no model in the cache; the next pull
#    resumes the .part (Range) and completes
rm -f "$repo/stories260K-Q8_0.gguf"
write_config '{"stories260K-Q8_0.gguf": {"drop": 3}}'
$T "$FORGE" pull test/stories-GGUF:Q8_0 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "interrupted pull: exit 1" [ $rc -eq 1 ]
tu_check "interrupted pull: no model file" [ ! -e "$repo/stories260K-Q8_0.gguf" ]
tu_check "interrupted pull: names the problem" grep -q "stories260K-Q8_0.gguf" "$tmp/err"
: >"$tmp/log"
kill "$server_pid"; wait "$server_pid" 2>/dev/null  # a fresh server forgets the drop count
write_config
rm -f "$tmp/port"
python3 "$(dirname "$0")/hub_server.py" "$tmp/config.json" "$tmp/port" "$tmp/log" 2>>"$tmp/server.err" &
server_pid=$!
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.1; done
export HF_ENDPOINT=http://127.0.0.1:$(cat "$tmp/port")
$T "$FORGE" pull test/stories-GGUF:Q8_0 >"$tmp/out" 2>"$tmp/err"
tu_check "next pull: resumes with a Range" grep -Eq '^GET /cdn/.*Q8_0.gguf range=bytes=[1-9][0-9]*-' "$tmp/log"
tu_check "next pull: sha256 matches" [ "$(sha "$repo/stories260K-Q8_0.gguf")" = "$(sha "$src/Q8.gguf")" ]

# 5. a corrupted body: sha256 mismatch, rejected, nothing left
write_config '{"stories260K-F32.gguf": {"corrupt": true}, "corrupt-Q5_0.gguf": {"corrupt": true}}'
$T "$FORGE" pull test/stories-GGUF:Q5_0 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "corrupt body: exit 1" [ $rc -eq 1 ]
tu_check "corrupt body: says sha256 mismatch" grep -q "sha256 mismatch" "$tmp/err"
tu_check "corrupt body: no file in the cache" bash -c "[ ! -e '$repo/corrupt-Q5_0.gguf' ] && ! ls -a '$repo/.tmp' | grep -q 'corrupt-Q5_0.gguf.part'"

# 6. the file the user already had is untouched when its new version fails to download
before=$(sha "$repo/stories260K-F32.gguf")
write_config '{"stories260K-F32.gguf": {"corrupt": true, "sha": "0000000000000000000000000000000000000000000000000000000000000001"}}'
$T "$FORGE" pull test/stories-GGUF:F32 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "changed + corrupt: exit 1" [ $rc -eq 1 ]
tu_check "changed + corrupt: said it changed" grep -q "changed on the hub" "$tmp/err"
tu_check "changed + corrupt: the cached file is untouched" [ "$(sha "$repo/stories260K-F32.gguf")" = "$before" ]
write_config

# 7. 401 without the token (message says HF_TOKEN), success with it, the token sent
$T "$FORGE" pull test/gated-GGUF:Q8_0 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "gated: exit 1 without a token" [ $rc -eq 1 ]
tu_check "gated: 401 and says to set HF_TOKEN" bash -c "grep -q '401' '$tmp/err' && grep -q 'HF_TOKEN' '$tmp/err'"
HF_TOKEN=wrong $T "$FORGE" pull test/gated-GGUF:Q8_0 >"$tmp/out" 2>"$tmp/err"
tu_check "gated: a wrong token is refused" grep -q "refused" "$tmp/err"
: >"$tmp/log"
HF_TOKEN=s3cret $T "$FORGE" pull test/gated-GGUF:Q8_0 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "gated: exit 0 with HF_TOKEN" [ $rc -eq 0 ]
tu_check "gated: Bearer token sent" grep -q "^GET /api/models/test/gated-GGUF .*auth=yes" "$tmp/log"
tu_check "gated: file cached" [ -f "$FORGE_CACHE/hub/test/gated-GGUF/gated-Q8_0.gguf" ]

# 8. an unknown quant: the error lists the quants the repo has
$T "$FORGE" pull test/stories-GGUF:Q3_K_S >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "unknown quant: exit 1" [ $rc -eq 1 ]
tu_check "unknown quant: lists the repo's quants" grep -q "Q3_K_S.*F16, F32, Q4_0, Q8_0" "$tmp/err"
$T "$FORGE" pull test/stories-GGUF >"$tmp/out" 2>"$tmp/err"
tu_check "no quant, several models: asks for one" grep -q "name one as test/stories-GGUF:QUANT" "$tmp/err"

# 9. a repo or a file that does not exist; a malformed name (usage, exit 2)
$T "$FORGE" pull test/nothing-here:Q4_0 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "missing repo: exit 1, not found" bash -c "[ $rc -eq 1 ] && grep -q 'repo test/nothing-here not found' '$tmp/err'"
$T "$FORGE" pull test/stories-GGUF/absent.gguf >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "missing file: exit 1, names it" bash -c "[ $rc -eq 1 ] && grep -q 'no file absent.gguf' '$tmp/err'"
$T "$FORGE" pull "../../etc:Q4_0" >"$tmp/out" 2>"$tmp/err"
tu_check "malformed name: exit 2" [ $? -eq 2 ]
tu_check "no cache dir made for missing things" [ ! -e "$FORGE_CACHE/hub/test/nothing-here" ]

# 10. a non-GGUF body served as .gguf: rejected, nothing left
$T "$FORGE" pull test/broken-GGUF:Q4_0 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "not GGUF: exit 1" [ $rc -eq 1 ]
tu_check "not GGUF: says so" grep -q "not GGUF" "$tmp/err"
$T "$FORGE" pull test/broken-GGUF:Q5_0 >"$tmp/out" 2>"$tmp/err"
tu_check "GGUF magic but truncated: rejected by the reader" bash -c "[ $? -eq 1 ] && grep -q 'not a valid GGUF file' '$tmp/err'"
tu_check "not GGUF: nothing in the cache" bash -c "[ -z \"\$(find '$FORGE_CACHE/hub/test/broken-GGUF' -type f ! -name '*.lock')\" ]"

# 11. --offline with and without the file cached (no request either way); FORGE_OFFLINE
: >"$tmp/log"
$T "$FORGE" pull --offline test/stories-GGUF:F16 >"$tmp/out" 2>"$tmp/err"
tu_check "offline, cached: exit 0, the cached path" bash -c "[ $? -eq 0 ] && [ \"\$(cat '$tmp/out')\" = '$repo/stories260K-F16.gguf' ]"
$T "$FORGE" pull --offline test/stories-GGUF:Q5_K_M >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "offline, not cached: exit 1" [ $rc -eq 1 ]
tu_check "offline, not cached: says offline and what is cached" grep -q "offline.*F16, F32, Q8_0" "$tmp/err"
FORGE_OFFLINE=1 $T "$FORGE" pull test/stories-GGUF:Q5_K_M >"$tmp/out" 2>"$tmp/err"
tu_check "FORGE_OFFLINE=1 is offline" grep -q "offline" "$tmp/err"
tu_check "offline: no request reached the hub" [ ! -s "$tmp/log" ]

# 12. a network error (nothing listens there): a clear error, nothing cached
HF_ENDPOINT=http://127.0.0.1:9 $T "$FORGE" pull test/other-GGUF:Q4_0 >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "network error: exit 1 with curl's reason" bash -c "[ $rc -eq 1 ] && grep -qi 'connect' '$tmp/err'"
tu_check "network error: nothing cached" [ ! -e "$FORGE_CACHE/hub/test/other-GGUF" ]

# 13. a full disk (a file size limit: writes fail with EFBIG like ENOSPC): error, no file left
write_config '{"full-Q6_K.gguf": {}}'
(trap '' XFSZ; ulimit -f 200; exec $T "$FORGE" pull test/stories-GGUF/full-Q6_K.gguf) >"$tmp/out" 2>"$tmp/err"
rc=$?
tu_check "full disk: exit 1" [ $rc -eq 1 ]
tu_check "full disk: names the write error" grep -q "writing .*too large" "$tmp/err"
tu_check "full disk: no partial file left" bash -c "[ ! -e '$repo/full-Q6_K.gguf' ] && ! ls -a '$repo/.tmp' | grep -q 'full-Q6_K.gguf.part'"
write_config

# 13b. a size that is not what the hub announced (X-Linked-Size): rejected, nothing left
write_config '{"size-Q6_K.gguf": {"size": 12345}}'
$T "$FORGE" pull test/stories-GGUF:Q6_K >"$tmp/out" 2>"$tmp/err"
tu_check "wrong size: exit 1, says so" bash -c "[ $? -eq 1 ] && grep -q 'the hub says 12345' '$tmp/err'"
tu_check "wrong size: nothing left" bash -c "[ ! -e '$repo/size-Q6_K.gguf' ] && ! ls -a '$repo/.tmp' | grep -q 'size-Q6_K.gguf.part'"
write_config

# 14. split files: all parts downloaded and joined into one GGUF that runs like the original
if [ $split_ok -eq 1 ]; then
    $T "$FORGE" pull test/stories-GGUF:Q4_0 >"$tmp/out" 2>"$tmp/err"
    rc=$?
    tu_check "split: exit 0" [ $rc -eq 0 ]
    tu_check "split: joined name" [ "$(cat "$tmp/out")" = "$repo/Q4_0/stories260K-Q4_0.gguf" ]
    tu_check "split: the parts are gone" bash -c "! ls -a '$repo/.tmp' | grep -q 'of-00003'"
    a=$("$FORGE" run -m "$src/F32.gguf" -p "Once upon a time" -n 16 --temp 0 -t 1 --ids 2>/dev/null | sed -n 's/^ids: //p')
    b=$("$FORGE" run -m "$repo/Q4_0/stories260K-Q4_0.gguf" -p "Once upon a time" -n 16 --temp 0 -t 1 --ids 2>/dev/null | sed -n 's/^ids: //p')
    tu_check "split: joined model generates the same ids" [ -n "$a" ] && [ "$a" = "$b" ]
    $T "$FORGE" pull --offline test/stories-GGUF/Q4_0/stories260K-Q4_0-00002-of-00003.gguf >"$tmp/out" 2>"$tmp/err"
    tu_check "split: a part's name finds the joined file" [ "$(cat "$tmp/out")" = "$repo/Q4_0/stories260K-Q4_0.gguf" ]
else
    tu_fail "split" "could not make split files with $test_hub --split"
fi

# 15. concurrent pulls of one file (a slow download): both succeed, the second waits on the lock
#     and finds the file in place, so the body is sent once; the file is intact
rm -rf "$FORGE_CACHE/hub/test/gated-GGUF"
write_config '{"slow-Q3_K_M.gguf": {"delay": 0.05}}'
: >"$tmp/log"
($T "$FORGE" pull test/stories-GGUF:Q3_K_M >"$tmp/c1" 2>&1; echo $? >"$tmp/rc1") &
p1=$!
($T "$FORGE" pull test/stories-GGUF:Q3_K_M >"$tmp/c2" 2>&1; echo $? >"$tmp/rc2") &
p2=$!
wait "$p1" "$p2"
tu_check "concurrent: both exit 0" [ "$(cat "$tmp/rc1")$(cat "$tmp/rc2")" = "00" ]
tu_check "concurrent: one waited for the other" grep -q "waiting for another download" "$tmp/c1" "$tmp/c2"
tu_check "concurrent: the body was sent once" [ "$(grep -c '^GET /cdn/.*slow-Q3_K_M.gguf' "$tmp/log")" -eq 1 ]
tu_check "concurrent: intact file" [ "$(sha "$repo/slow-Q3_K_M.gguf")" = "$(sha "$src/F32.gguf")" ]
tu_check "concurrent: no leftovers" no_gguf_left
write_config
HF_TOKEN=s3cret $T "$FORGE" pull -q test/gated-GGUF:Q8_0 >/dev/null 2>&1

# 16. forge models: lists repo, file, size, type; models rm
"$FORGE" models >"$tmp/out" 2>"$tmp/err"
tu_check "models: exit 0" [ $? -eq 0 ]
tu_check "models: lists the F16 file with its type" grep -Eq "^test/stories-GGUF +stories260K-F16.gguf +0\.[0-9] MiB +llama, 29[0-9]\.?[0-9]*K params, F16" "$tmp/out"
tu_check "models: lists the gated repo" grep -q "^test/gated-GGUF  *gated-Q8_0.gguf" "$tmp/out"
tu_check "models: last used column" grep -Eq "stories260K-F32.gguf .* 20[0-9]{2}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}$" "$tmp/out"
touch -a -d "2020-01-02 03:04" "$repo/stories260K-F32.gguf"
"$FORGE" models >/dev/null 2>&1
"$FORGE" models >"$tmp/out" 2>&1
tu_check "models: last used is the access time, and listing is not a use" grep -q "stories260K-F32.gguf .* 2020-01-02 03:04$" "$tmp/out"
tu_check "models: no .part or broken files listed" bash -c "! grep -Eq 'broken|corrupt|\\.part' '$tmp/out'"
"$FORGE" models rm test/stories-GGUF:F16 >"$tmp/out" 2>"$tmp/err"
tu_check "models rm QUANT: exit 0, file gone" bash -c "[ $? -eq 0 ] && [ ! -e '$repo/stories260K-F16.gguf' ] && [ -e '$repo/stories260K-F32.gguf' ]"
"$FORGE" models rm test/stories-GGUF:F16 >"$tmp/out" 2>"$tmp/err"
tu_check "models rm of nothing: exit 1" [ $? -eq 1 ]
"$FORGE" models rm test/gated-GGUF >"$tmp/out" 2>"$tmp/err"
tu_check "models rm REPO: all gone" bash -c "[ $? -eq 0 ] && [ ! -e '$FORGE_CACHE/hub/test/gated-GGUF' ]"
"$FORGE" models rm 'a/../b' >/dev/null 2>&1
tu_check "models rm bad name: exit 2" [ $? -eq 2 ]

# 17. run -hf uses the cached file without asking the hub; -m and -hf together is usage
: >"$tmp/log"
$T "$FORGE" run -hf test/stories-GGUF:F32 -p "Once upon a time" -n 16 --temp 0 -t 1 --ids >"$tmp/out" 2>"$tmp/err"
rc=$?
want=$("$FORGE" run -m "$src/F32.gguf" -p "Once upon a time" -n 16 --temp 0 -t 1 --ids 2>/dev/null | sed -n 's/^ids: //p')
tu_check "run -hf: exit 0" [ $rc -eq 0 ]
tu_check "run -hf: loads the cached file" grep -q "loaded $repo/stories260K-F32.gguf" "$tmp/err"
tu_check "run -hf: same ids as the file" [ "$(sed -n 's/^ids: //p' "$tmp/out")" = "$want" ]
tu_check "run -hf: no request (cache hit)" [ ! -s "$tmp/log" ]
$T "$FORGE" bench -hf test/stories-GGUF:F16 -p 8 -n 4 -r 1 -t 1 >"$tmp/out" 2>"$tmp/err"
tu_check "bench -hf: a missing file is downloaded" bash -c "[ $? -eq 0 ] && [ -f '$repo/stories260K-F16.gguf' ]"
"$FORGE" run -m "$src/F32.gguf" -hf test/stories-GGUF:F32 -p x >/dev/null 2>"$tmp/err"
tu_check "run -m and -hf: exit 2" [ $? -eq 2 ]
"$FORGE" run --offline -hf test/stories-GGUF:Q6_K -p x >/dev/null 2>"$tmp/err"
tu_check "run --offline -hf not cached: exit 1, offline" bash -c "[ $? -eq 1 ] && grep -q offline '$tmp/err'"
"$FORGE" chat -hf >/dev/null 2>"$tmp/err"
tu_check "chat -hf without a value: exit 2" [ $? -eq 2 ]

tu_done
