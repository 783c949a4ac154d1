#!/usr/bin/env bash
# gpu-engine-run.sh - the engine on the GPU machine (the GPU backend end to end), logs to $OUT:
#   1. stories260K (F32, F16, Q8_0-mix, Q4_0-mix): `forge run --temp 0 --ids` on --device gpu vs
#      cpu for every prompt of greedy_summary.tsv, F32 and F16 KV, and vs llama.cpp's ids
#   2. tests/gpu/test_gpu_engine on the hf-ref models (logits NMSE vs HF, greedy ids GPU == CPU)
#   3. tests/test_device.sh (the GPU-present branch)
#   4. compute-sanitizer memcheck over short GPU runs (matvec prompt path and GEMM prompt path)
#   5. forge bench -p 512 -n 128 --device gpu on synthetic llama2-7b Q4_0 / Q8_0 / F16 and
#      llama3.2-1b Q4_0 (made by forge synth on the machine's CPU, in /tmp)
# Usage: bash scripts/gpu-engine-run.sh BUILD FIXTURES [bench types...]
#   FIXTURES holds shared/testdata/{models,reference} (stories260K*.gguf, greedy_summary.tsv)
#   and hf-ref/ (the layout of ../shared).
set -uo pipefail
B=${1:-build}
FX=${2:-.dev/fixtures}
shift 2 || true
BENCH_TYPES=${*:-Q4_0 Q8_0 F16}
OUT=${OUT:-/tmp/gpu-engine-out}
mkdir -p "$OUT"
F=$B/forge
fails=0
note() { echo "=== $* ($(date -u +%T))"; }

note "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true

note "1. stories260K greedy ids, GPU vs CPU vs llama.cpp"
tsv=$FX/shared/testdata/reference/greedy_summary.tsv
models=$FX/shared/testdata/models
col() { awk -F'\t' -v c="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) k = i; next } { print $k }' "$tsv"; }
n_rows=$(($(wc -l <"$tsv") - 1))
for ((r = 1; r <= n_rows; r++)); do
    file=$(col model_file | sed -n "${r}p")
    kv=$(col kv_cache | sed -n "${r}p")
    prompt=$(col prompt_json | sed -n "${r}p" | sed 's/^"//; s/"$//')
    want=$(col generated_token_ids | sed -n "${r}p")
    n=$(echo "$want" | wc -w)
    cpu=$("$F" run -m "$models/$file" -p "$prompt" -n "$n" --temp 0 --kv-type "$kv" --ids --device cpu 2>/dev/null | sed -n 's/^ids: //p')
    gpu=$("$F" run -m "$models/$file" -p "$prompt" -n "$n" --temp 0 --kv-type "$kv" --ids --device gpu 2>"$OUT/err.txt" | sed -n 's/^ids: //p')
    if [ -n "$gpu" ] && [ "$gpu" = "$cpu" ]; then res="GPU==CPU"; else res="GPU!=CPU"; fails=$((fails + 1)); fi
    [ "$gpu" = "$want" ] && ref="==llama.cpp" || ref="!=llama.cpp"
    [ "$cpu" = "$want" ] && cref="==llama.cpp" || cref="!=llama.cpp"
    echo "$res  gpu$ref cpu$cref  $file kv=$kv '$prompt' ($n ids)"
    if [ "$res" = "GPU!=CPU" ]; then echo "  cpu: $cpu"; echo "  gpu: $gpu"; head -3 "$OUT/err.txt"; fi
done

note "2. hf-ref: logits NMSE and greedy ids"
"$B/tests/gpu/test_gpu_engine" "$FX/hf-ref" || fails=$((fails + 1))

note "2b. test_gpu_ops --quick (kernels, incl. decode attention)"
[ -x "$B/tests/gpu/test_gpu_ops" ] && { "$B/tests/gpu/test_gpu_ops" --quick 2>&1 | tail -3 || fails=$((fails + 1)); }

note "3. tests/test_device.sh"
FORGE=$F FORGE_SHARED=$FX/shared bash tests/test_device.sh || fails=$((fails + 1))

note "4. compute-sanitizer memcheck"
CS=compute-sanitizer
command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
$CS --tool memcheck --leak-check full --error-exitcode 9 "$F" run -m "$models/stories260K-Q4_0-mix.gguf" \
    -p "Once upon a time" -n 24 --temp 0 --ids --device gpu --kv-type f16 2>&1 | tail -8
echo "memcheck (matvec path) rc=${PIPESTATUS[0]}"
FORGE_GPU_GEMM_MIN=2 $CS --tool memcheck --leak-check full --error-exitcode 9 "$F" run \
    -m "$models/stories260K-Q8_0-mix.gguf" -p "Once upon a time there was" -n 16 --temp 0 --ids \
    --device gpu 2>&1 | tail -8
echo "memcheck (GEMM path) rc=${PIPESTATUS[0]}"

note "5. bench"
bench() { # bench SHAPE TYPE
    local m=/tmp/synth-$1-$2.gguf
    "$F" synth --shape "$1" --type "$2" -o "$m" --force >/dev/null 2>&1 || { echo "synth $1 $2 failed"; return; }
    note "bench $1 $2"
    "$F" bench -m "$m" -p 512 -n 128 -r 2 --device gpu 2>&1
    if [ "$1" = llama2-7b ] && [ "$2" = Q4_0 ]; then
        note "same, prompt attention one launch per position (FORGE_GPU_ATTN_BATCH=0)"
        FORGE_GPU_ATTN_BATCH=0 "$F" bench -m "$m" -p 512 -n 0 -r 2 --device gpu 2>&1 | grep pp512
    fi
    rm -f "$m"
}
bench llama2-7b Q4_0
bench llama3.2-1b Q4_0
for t in $BENCH_TYPES; do
    [ "$t" = Q4_0 ] && continue
    bench llama2-7b "$t"
done
note "done: $fails failing group(s)"
exit $((fails > 0))
