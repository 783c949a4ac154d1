#!/usr/bin/env bash
# gpu-mmq-run.sh - one device call for the quantized products on the int8 tensor cores (gpu_mmq:
# Q8_0/Q4_0 GEMM rows up to FORGE_GPU_MMQ_MAX without a dequantized copy). Logs under $OUT, one
# line per step on stdout.
#   1. tests (while the 7B model is made on the CPU): test_gpu_mmq (vs the multi-row matvec, odd
#      and 7B shapes, beta, determinism, errors), test_gpu_archs models tiny-gqa (Q4_0/Q8_0 40-token
#      prompts through gpu_mmq vs the CPU; the K-quant mixes), test_gpu_engine_core (batch
#      invariance: unchanged kernels), compute-sanitizer memcheck of test_gpu_mmq --quick
#   2. bench_gpu_mmq (gpu_mmq vs dequantize + cuBLAS vs the multi-row matvec)
#   3. forge synth --shape llama2-7b --type Q4_0; forge bench --parallel 1,4,16,64 -p 128 -n 128
#      NEW, OLD, NEW with FORGE_GPU_MMQ_MAX=0 (interleaved), and a context's pp512/tg128; then
#      the same file quantized to Q4_K_M and Q6_K (forge quantize --allow-requantize): a
#      context's pp512/tg128, NEW and OLD
# QUICK=1: step 1, test_gpu_ops and test_gpu_fused, then --parallel 1,16,64 NEW and OLD only.
# Usage: bash scripts/gpu-mmq-run.sh NEW OLD FIXTURES
#   NEW, OLD: directories with forge, libforge_cuda.so, tests/gpu/*, bench/gpu/*; FIXTURES:
#   stories260K.gguf and stories260K-Q4_0-mix.gguf; LIBS (optional): shared libraries the machine
#   lacks.
set -uo pipefail
NEW=$1
OLD=$2
FX=$3
OUT=${OUT:-/tmp/gpu-mmq-out}
BUDGET=${BUDGET:-570}
source "$(dirname "$0")/gpu-lib.sh"
gpu_run_start "$NEW/libforge_cuda.so"
M=/tmp/7b-Q4_0.gguf
("$NEW/forge" synth --shape llama2-7b --type Q4_0 -o $M --force >"$OUT/synth.log" 2>&1 &&
    touch /tmp/7b-Q4_0.ok) &
models=$!
kq() { # the K-quant files from the Q4_0 one (forge quantize --allow-requantize), in the background
    for t in Q4_K_M Q6_K; do
        "$NEW/forge" quantize $M /tmp/7b-$t.gguf $t --allow-requantize -t 12 \
            >"$OUT/quantize-$t.log" 2>&1 </dev/null && touch /tmp/7b-$t.ok
    done
}

run_log mmq 120 "$NEW/tests/gpu/test_gpu_mmq"
grep -E "FAIL" "$OUT/mmq.log" | head -20
run_log archs-models 200 "$NEW/tests/gpu/test_gpu_archs" models tiny-gqa
grep -E "FAIL" "$OUT/archs-models.log" | head -20
run_log engine-core 150 env FORGE_GPU_GEMM_MIN=1000000 FORGE_GPU_FATTN_MIN=1000000 \
    "$NEW/tests/gpu/test_gpu_engine_core" "$FX/stories260K.gguf" "$FX/stories260K-Q4_0-mix.gguf"
run_log mmq-memcheck 150 $CS --tool memcheck --error-exitcode 9 "$NEW/tests/gpu/test_gpu_mmq" --quick
grep -B2 -A6 "Invalid" "$OUT/mmq-memcheck.log" | head -20
if [ "${QUICK:-0}" = 1 ]; then # the other tests the change touches, then decode at 1/16/64 streams
    run_log ops 120 "$NEW/tests/gpu/test_gpu_ops"
    run_log fused 150 "$NEW/tests/gpu/test_gpu_fused"
    wait $models
    for d in "$NEW" "$OLD"; do
        echo "--- $d ($(date -u +%T))"
        FORGE_GPU_LIB="$PWD/$d/libforge_cuda.so" timeout 100 "$d/forge" bench -m $M \
            --parallel 1,16,64 -p 128 -n 128 --device gpu 2>&1 | grep -E "^\| +[0-9]"
    done
    echo "gpu-mmq (quick): $fails failing step(s) ($(date -u +%T))"
    exit $((fails > 0))
fi

echo "=== bench_gpu_mmq ($(date -u +%T))"
timeout 90 "$NEW/bench/gpu/bench_gpu_mmq" >"$OUT/bench_mmq.log" 2>&1
grep -vE "^$" "$OUT/bench_mmq.log" | tail -45

wait $models
[ -f /tmp/7b-Q4_0.ok ] || { echo "synth failed"; tail -3 "$OUT/synth.log"; exit 1; }
par() { # LABEL DIR [ENV...]
    local label=$1 dir=$2
    shift 2
    [ $((BUDGET - SECONDS)) -lt 40 ] && { echo "$label: SKIPPED (budget)"; return; }
    echo "--- $label ($(date -u +%T))"
    env "$@" FORGE_GPU_LIB="$PWD/$dir/libforge_cuda.so" timeout 150 "$dir/forge" bench -m $M \
        --parallel 1,4,16,64 -p 128 -n 128 --device gpu 2>&1 | tee "$OUT/par_$label.log" |
        grep -E "^\|" | grep -vE "^\| *-"
}
ctxb() { # LABEL DIR [MODEL]
    local m=${3:-$M}
    [ $((BUDGET - SECONDS)) -lt 30 ] && { echo "$1 ctx: SKIPPED (budget)"; return; }
    [ -f "${m%.gguf}.ok" ] || { echo "$1: no model $m"; return; }
    echo "--- $1 context ($(date -u +%T))"
    FORGE_GPU_LIB="$PWD/$2/libforge_cuda.so" timeout 90 "$2/forge" bench -m "$m" -p 512 -n 128 \
        -r 2 --device gpu 2>&1 | tee "$OUT/ctx_$1.log" | grep -E "pp512|tg128"
}
kq &
kqp=$!
par new "$NEW"
par old "$OLD"
par new-mmq-off "$NEW" FORGE_GPU_MMQ_MAX=0
ctxb new "$NEW"
ctxb old "$OLD"
par new-2 "$NEW"
wait $kqp
for t in Q4_K_M Q6_K; do
    ctxb "$t-new" "$NEW" /tmp/7b-$t.gguf
    ctxb "$t-old" "$OLD" /tmp/7b-$t.gguf
done
echo "gpu-mmq: $fails failing step(s) ($(date -u +%T))"
exit $((fails > 0))
