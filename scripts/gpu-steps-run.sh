#!/usr/bin/env bash
# gpu-steps-run.sh - engine decode steps on the GPU machine in one device call (issue 12):
# recorded engine steps (graphs per rows and attention bucket) and the multi-row matvec with
# several weight rows per warp. Logs under $OUT, one line per step on stdout.
#   (FORGE_GPU_ENGINE_STEPS=1 unless set: the default since their first run)
#   1. test_gpu_paged: multi-row matvec == one-row matvec bit for bit, with the default weight
#      rows per warp and with FORGE_GPU_MULTI_RW=1, 2, 4 (the kernel of branch gpu-multi-rw;
#      main's kernel ignores the variable)
#   2. test_gpu_engine_core on stories260K and its Q4_0 mix (batch invariant settings), incl.
#      steps recorded (FORGE_GPU_GRAPH=1) and unrecorded (=0); test_gpu_archs models (every
#      family's engine alone == batched); compute-sanitizer memcheck of test_gpu_engine_core on
#      stories260K
#   3. bench_gpu_paged (decode matmul of 2..16 rows), OLD vs NEW, NEW per FORGE_GPU_MULTI_RW
#   4. forge synth --shape llama2-7b --type Q4_0, then forge bench --parallel 1,4,16,64
#      -p 128 -n 128 and forge bench -p 512 -n 128 (a context), OLD and NEW interleaved, NEW
#      with FORGE_GPU_ENGINE_STEPS=0 and with FORGE_GPU_MULTI_RW=4 too; NEW
#      also with every matmul through the matvec (FORGE_GPU_GEMM_MIN=1000000); a context at
#      depth 4096 and 8192 (F16 and F32 KV)
# Usage: bash scripts/gpu-steps-run.sh NEW OLD FIXTURES
#   NEW, OLD: directories with forge, libforge_cuda.so, tests/gpu/*, bench/gpu/* (OLD: the
#   build to compare with; its tests are not run); FIXTURES: stories260K.gguf and
#   stories260K-Q4_0-mix.gguf; LIBS (optional): shared libraries the machine lacks.
set -uo pipefail
export FORGE_GPU_ENGINE_STEPS=${FORGE_GPU_ENGINE_STEPS:-1}
NEW=$1
OLD=$2
FX=$3
OUT=${OUT:-/tmp/gpu-steps-out}
BUDGET=${BUDGET:-580}
source "$(dirname "$0")/gpu-lib.sh"
gpu_run_start "$NEW/libforge_cuda.so"
INV="FORGE_GPU_GEMM_MIN=1000000 FORGE_GPU_FATTN_MIN=1000000"

run_log paged 150 "$NEW/tests/gpu/test_gpu_paged" "$FX"
for rw in 1 2 4; do
    FORGE_GPU_MULTI_RW=$rw run_log "paged-rw$rw" 120 "$NEW/tests/gpu/test_gpu_paged" "$FX"
done
run_log engine-core 150 env $INV "$NEW/tests/gpu/test_gpu_engine_core" "$FX/stories260K.gguf" \
    "$FX/stories260K-Q4_0-mix.gguf"
[ -x "$NEW/tests/gpu/test_gpu_archs" ] &&
    run_log archs-models 150 "$NEW/tests/gpu/test_gpu_archs" models
run_log engine-core-memcheck 200 env $INV FORGE_GPU_TEST_UNDER_SANITIZER=1 $CS --tool memcheck \
    --error-exitcode 9 "$NEW/tests/gpu/test_gpu_engine_core" "$FX/stories260K.gguf"

echo "=== bench_gpu_paged: decode matmul (old / new / new per weight rows per warp)"
for v in old new rw1 rw2 rw4; do
    case $v in
    old) b=$OLD env= ;;
    new) b=$NEW env= ;;
    *) b=$NEW env="FORGE_GPU_MULTI_RW=${v#rw}" ;;
    esac
    echo "--- $v"
    env $env timeout 60 "$b/bench/gpu/bench_gpu_paged" 2>&1 | grep -E "^matmul" | tee -a "$OUT/bench_paged_$v.log"
done

M=/tmp/7b-q4.gguf
echo "=== synth llama2-7b Q4_0 ($(date -u +%T))"
timeout 200 "$NEW/forge" synth --shape llama2-7b --type Q4_0 -o $M --force >"$OUT/synth.log" 2>&1 ||
    { echo "synth failed"; tail -3 "$OUT/synth.log"; exit 1; }
par() { # LABEL DIR [ENV...]
    local label=$1 dir=$2
    shift 2
    [ $((BUDGET - SECONDS)) -lt 40 ] && { echo "$label: SKIPPED (budget)"; return; }
    echo "--- $label ($(date -u +%T))"
    env "$@" FORGE_GPU_LIB="$PWD/$dir/libforge_cuda.so" timeout 150 "$dir/forge" bench -m $M \
        --parallel 1,4,16,64 -p 128 -n 128 --device gpu 2>&1 | tee "$OUT/par_$label.log" |
        grep -E "^\|" | grep -vE "^\| *-"
}
ctxb() { # LABEL DIR
    [ $((BUDGET - SECONDS)) -lt 30 ] && { echo "$1 ctx: SKIPPED (budget)"; return; }
    echo "--- $1 context ($(date -u +%T))"
    FORGE_GPU_LIB="$PWD/$2/libforge_cuda.so" timeout 90 "$2/forge" bench -m $M -p 512 -n 128 \
        -r 2 --device gpu 2>&1 | tee "$OUT/ctx_$1.log" | grep -E "pp512|tg128"
}
depth() { # KV
    [ $((BUDGET - SECONDS)) -lt 40 ] && { echo "depth $1: SKIPPED (budget)"; return; }
    echo "--- new context at depth, KV $1 ($(date -u +%T))"
    FORGE_GPU_LIB="$PWD/$NEW/libforge_cuda.so" timeout 120 "$NEW/forge" bench -m $M -p 512 \
        -n 128 -r 2 -d 4096,8192 -c 8448 --kv-type "$1" --device gpu 2>&1 |
        tee "$OUT/depth_$1.log" | grep -E "pp512|tg128"
    [ "${PIPESTATUS[0]}" = 0 ] || tail -3 "$OUT/depth_$1.log"
}
par new "$NEW"
par old "$OLD"
par new-steps-off "$NEW" FORGE_GPU_ENGINE_STEPS=0
par new-rw4 "$NEW" FORGE_GPU_MULTI_RW=4
ctxb new "$NEW"
ctxb old "$OLD"
depth f16
depth f32
par new-matvec-only "$NEW" FORGE_GPU_GEMM_MIN=1000000
par new-2 "$NEW"
echo "gpu-steps: $fails failing step(s) ($(date -u +%T))"
exit $((fails > 0))
