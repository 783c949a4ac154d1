#!/usr/bin/env bash
# gpu-kq-run.sh - one device call for the single-sequence decode of K-quant files (issue 13):
# grouped sub-block fetches in the fused matvec (Q4_K/Q5_K pairs, Q6_K fours) and one fused
# launch per type for a layer whose Q/K/V differ in type (Q4_K_M's Q6_K attn_v). Logs under $OUT,
# one line per step on stdout.
#   1. tests (while the models are made on the CPU): test_gpu_fused (every type, the 7B
#      shapes), test_gpu_ops, test_gpu_archs models tiny-gqa (F32, Q4_K_M, Q5_K_M); at the end,
#      compute-sanitizer memcheck of test_gpu_fused --quick
#   2. bench_gpu_matvec (plain and fused matvec per type on 7B shapes), the new program against
#      OLD's library and NEW's (the API is the same)
#   3. forge synth --shape llama2-7b --type Q4_0, forge quantize of it to Q4_K_M and Q6_K
#      (--allow-requantize), then forge bench -p 512 -n 128 -r 2 per model, OLD and NEW
#      interleaved, NEW twice
# Usage: bash scripts/gpu-kq-run.sh NEW OLD
#   NEW, OLD: directories with forge, libforge_cuda.so, tests/gpu/*, bench/gpu/* (OLD: the build
#   to compare with; its tests are not run); LIBS (optional): shared libraries the machine lacks.
set -uo pipefail
NEW=$1
OLD=$2
OUT=${OUT:-/tmp/gpu-kq-out}
BUDGET=${BUDGET:-570}
source "$(dirname "$0")/gpu-lib.sh"
gpu_run_start "$NEW/libforge_cuda.so"
Q4=/tmp/7b-Q4_0.gguf

# the models, on the CPU, while the tests run
(
    "$NEW/forge" synth --shape llama2-7b --type Q4_0 -o $Q4 --force >"$OUT/synth.log" 2>&1 &&
        touch /tmp/7b-Q4_0.ok &&
        for t in Q4_K_M Q6_K; do
            "$NEW/forge" quantize $Q4 /tmp/7b-$t.gguf $t --allow-requantize -t 14 \
                >"$OUT/quantize-$t.log" 2>&1 </dev/null && touch /tmp/7b-$t.ok
        done
) &
models=$!

run_log fused 200 "$NEW/tests/gpu/test_gpu_fused"
run_log ops 150 "$NEW/tests/gpu/test_gpu_ops"
run_log archs-models 200 "$NEW/tests/gpu/test_gpu_archs" models tiny-gqa

echo "=== bench_gpu_matvec fused lines, OLD library / NEW library ($(date -u +%T))"
mkdir -p "$OLD/bench/gpu"
cp "$NEW/bench/gpu/bench_gpu_matvec" "$OLD/bench/gpu/bench_gpu_matvec" # rpath: $ORIGIN/../..
for v in old new; do
    [ $v = old ] && d=$OLD || d=$NEW
    timeout 90 "$d/bench/gpu/bench_gpu_matvec" >"$OUT/bench_matvec_$v.log" 2>&1
    echo "--- $v rc=$?"
    grep -E "^fused|^copy kernel|Q4_0  4096x4096" "$OUT/bench_matvec_$v.log"
done

echo "=== waiting for the models ($(date -u +%T))"
wait $models
ls -la /tmp/7b-*.gguf | awk '{print $5, $9}'
tail -2 "$OUT"/quantize-*.log
ctxb() { # LABEL DIR MODEL
    [ $((BUDGET - SECONDS)) -lt 30 ] && { echo "$1: SKIPPED (budget)"; return; }
    [ -f "${3%.gguf}.ok" ] || { echo "$1: no model $3"; return; }
    echo "--- $1 ($(date -u +%T))"
    FORGE_GPU_LIB="$PWD/$2/libforge_cuda.so" timeout 90 "$2/forge" bench -m "$3" -p 512 -n 128 \
        -r 2 --device gpu 2>&1 | tee "$OUT/ctx_$1.log" | grep -E "pp512|tg128"
}
for t in Q4_K_M Q4_0 Q6_K; do
    ctxb "$t-new" "$NEW" /tmp/7b-$t.gguf
    ctxb "$t-old" "$OLD" /tmp/7b-$t.gguf
done
ctxb Q4_K_M-new-2 "$NEW" /tmp/7b-Q4_K_M.gguf
ctxb Q4_K_M-old-2 "$OLD" /tmp/7b-Q4_K_M.gguf
run_log fused-memcheck 150 $CS --tool memcheck --error-exitcode 9 \
    "$NEW/tests/gpu/test_gpu_fused" --quick
if [ -x "$NEW/tests/gpu/test_gpu_mmq" ]; then # the tensor-core GEMM on quantized blocks
    run_log mmq 90 "$NEW/tests/gpu/test_gpu_mmq"
    grep -E "FAIL" "$OUT/mmq.log" | head -20
    timeout 90 "$NEW/bench/gpu/bench_gpu_mmq" 2>&1 | tail -40
fi
echo "gpu-kq: $fails failing step(s) ($(date -u +%T))"
exit $((fails > 0))
