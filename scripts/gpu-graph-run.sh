#!/usr/bin/env bash
# gpu-graph-run.sh - the decode-graph step on the GPU machine (one short call), logs to $OUT:
#   0. forge synth of llama3.2-1b and llama2-7b Q4_0 start in the background (machine's CPU)
#   1. tests/gpu/test_gpu_engine with FORGE_GPU_GRAPH=1 (graphs, a failed capture is an error)
#      and FORGE_GPU_GRAPH=0 (same ops, no graphs); each also runs its no-graph variant and
#      forge_decode_greedy (device argmax)
#   2. compute-sanitizer memcheck --leak-check full of `forge run --device gpu --temp 0 -n 16`
#      on stories260K (graphs on: capture, replay, device argmax)
#   2b. test_gpu_ops --quick (with gpu_store_at replayed in a graph); 2c. FORGE_GPU_SYNC=1 ids
#   3. forge bench -p 512 -n 128 -r 2 --device gpu, graphs on vs off: llama3.2-1b Q4_0, then
#      llama2-7b Q4_0 if the synth is done in time
#   4. stories260K greedy ids (prompts of greedy_summary.tsv, F32 and F16 KV) while time is
#      left: GPU with and without graphs vs CPU
# Usage: bash scripts/gpu-graph-run.sh BUILD FIXTURES [deadline_s]
#   BUILD holds forge, libforge_cuda.so, tests/gpu/test_gpu_engine (built here);
#   FIXTURES the layout of ../shared (shared/testdata/..., hf-ref/) plus lib/ (libcjson etc.).
set -uo pipefail
B=${1:-build-gpug}
FX=${2:-.dev/fixtures-gpub}
DEADLINE=${3:-200}
OUT=${OUT:-/tmp/gpu-graph-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$FX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
F=$B/forge
fails=0
if ldd "$B/libforge_cuda.so" | grep -q "not found"; then
    # cuBLAS not at the rpath: try the pip wheel's copy (as scripts/gpu-run.sh)
    d=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null)
    [ -n "$d" ] && export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
fi
note() { echo "=== $* (t=${SECONDS}s, $(date -u +%T))"; }
left() { [ $SECONDS -lt $((DEADLINE - $1)) ]; } # at least $1 s left before the deadline

note "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true

note "0. synth in the background"
rm -f /tmp/synth-1b.ok /tmp/synth-7b.ok
("$F" synth --shape llama3.2-1b --type Q4_0 -o /tmp/synth-1b.gguf --force >/dev/null 2>&1 &&
    touch /tmp/synth-1b.ok) &
pid_1b=$!
("$F" synth --shape llama2-7b --type Q4_0 -o /tmp/synth-7b.gguf --force >/dev/null 2>&1 &&
    touch /tmp/synth-7b.ok) &
pid_7b=$!

note "1. test_gpu_engine, FORGE_GPU_GRAPH=1"
FORGE_GPU_GRAPH=1 timeout 90 "$B/tests/gpu/test_gpu_engine" "$FX/hf-ref" >"$OUT/engine-graph1.log" 2>&1
rc=$?
grep -E "FAIL|passed|error" "$OUT/engine-graph1.log"
[ $rc -ne 0 ] && fails=$((fails + 1)) && echo "rc=$rc"
note "1b. test_gpu_engine, FORGE_GPU_GRAPH=0"
FORGE_GPU_GRAPH=0 timeout 90 "$B/tests/gpu/test_gpu_engine" "$FX/hf-ref" >"$OUT/engine-graph0.log" 2>&1
rc=$?
grep -E "FAIL|passed|error" "$OUT/engine-graph0.log"
[ $rc -ne 0 ] && fails=$((fails + 1)) && echo "rc=$rc"

models=$FX/shared/testdata/models
note "2. compute-sanitizer memcheck, graphs on"
CS=compute-sanitizer
command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
FORGE_GPU_GRAPH=1 timeout 90 $CS --tool memcheck --leak-check full --error-exitcode 9 "$F" run \
    -m "$models/stories260K.gguf" -p "Once upon a time" -n 16 --temp 0 --ids --device gpu \
    >"$OUT/memcheck.log" 2>&1
rc=$?
tail -6 "$OUT/memcheck.log"
echo "memcheck rc=$rc"
[ $rc -ne 0 ] && fails=$((fails + 1))

note "2b. test_gpu_ops --quick (kernels; gpu_store_at replayed in a graph)"
timeout 60 "$B/tests/gpu/test_gpu_ops" --quick >"$OUT/ops.log" 2>&1
rc=$?
grep -E "FAIL|store_at|passed" "$OUT/ops.log"
[ $rc -ne 0 ] && fails=$((fails + 1))

note "2c. FORGE_GPU_SYNC=1 (graphs off) vs graphs on, stories260K"
sargs=(run -m "$models/stories260K.gguf" -p "Once upon a time" -n 32 --temp 0 --ids --device gpu)
a=$(FORGE_GPU_GRAPH=1 "$F" "${sargs[@]}" 2>&1 | sed -n 's/^ids: //p')
b=$(FORGE_GPU_SYNC=1 "$F" "${sargs[@]}" 2>&1 | sed -n 's/^ids: //p')
if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "sync==graph ($a)"; else echo "sync!=graph"; echo " graph: $a"; echo " sync:  $b"; fails=$((fails + 1)); fi

note "3. bench, graphs on vs off"
bench() { # NAME FILE
    note "bench $1, graphs on"
    timeout 60 "$F" bench -m "$2" -p 512 -n 128 -r 2 --device gpu 2>&1 | grep -E "^\|"
    note "bench $1, FORGE_GPU_GRAPH=0"
    FORGE_GPU_GRAPH=0 timeout 60 "$F" bench -m "$2" -p 0 -n 128 -r 2 --device gpu 2>&1 | grep -E "^\|"
}
while [ ! -f /tmp/synth-1b.ok ] && kill -0 $pid_1b 2>/dev/null && left 60; do sleep 1; done
[ -f /tmp/synth-1b.ok ] && bench llama3.2-1b-Q4_0 /tmp/synth-1b.gguf
while [ ! -f /tmp/synth-7b.ok ] && kill -0 $pid_7b 2>/dev/null && left 40; do sleep 1; done
if [ -f /tmp/synth-7b.ok ] && left 35; then
    bench llama2-7b-Q4_0 /tmp/synth-7b.gguf
else
    echo "llama2-7b Q4_0: synth not done in time, skipped"
fi
note "4. stories260K greedy ids: GPU graph / GPU no graph / CPU"
tsv=$FX/shared/testdata/reference/greedy_summary.tsv
col() { awk -F'\t' -v c="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) k = i; next } { print $k }' "$tsv"; }
n_rows=$(($(wc -l <"$tsv") - 1))
for ((r = 1; r <= n_rows; r++)); do
    left 15 || { echo "(skipped the rest: time)"; break; }
    file=$(col model_file | sed -n "${r}p")
    kv=$(col kv_cache | sed -n "${r}p")
    prompt=$(col prompt_json | sed -n "${r}p" | sed 's/^"//; s/"$//')
    n=$(col generated_token_ids | sed -n "${r}p" | wc -w)
    args=(run -m "$models/$file" -p "$prompt" -n "$n" --temp 0 --kv-type "$kv" --ids)
    cpu=$("$F" "${args[@]}" --device cpu 2>/dev/null | sed -n 's/^ids: //p')
    g1=$(FORGE_GPU_GRAPH=1 "$F" "${args[@]}" --device gpu 2>"$OUT/err.txt" | sed -n 's/^ids: //p')
    g0=$(FORGE_GPU_GRAPH=0 "$F" "${args[@]}" --device gpu 2>>"$OUT/err.txt" | sed -n 's/^ids: //p')
    if [ -n "$g1" ] && [ "$g1" = "$g0" ]; then res="graph==nograph"; else res="graph!=nograph"; fails=$((fails + 1)); fi
    [ "$g1" = "$cpu" ] && c="==CPU" || c="!=CPU"
    echo "$res gpu$c  $file kv=$kv '$prompt' ($n ids)"
    [ "$res" = "graph!=nograph" ] && { echo "  g1: $g1"; echo "  g0: $g0"; head -3 "$OUT/err.txt"; }
done

kill $pid_1b $pid_7b 2>/dev/null
note "done: $fails failing group(s)"
exit $((fails > 0))
