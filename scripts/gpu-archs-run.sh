#!/usr/bin/env bash
# gpu-archs-run.sh - the GPU path of issue 15's families (Gemma 2/3, Phi-3, ChatGLM/GLM-4,
# Mixtral, Qwen3-MoE) on the GPU machine in one device call; logs to $OUT:
#   1. test_gpu_archs: ops (geglu/scale/softcap), attention with softcap and window in every
#      path, moe_ffn, the tiny models vs the CPU and the engine alone == batched
#   2. the earlier GPU tests of the kernels this work changed (attention, matvec, fused, paged)
#   3. test_gpu_archs with FORGE_GPU_SYNC=1 (each launch checked at once: an execution error
#      names its kernel; no graphs), the models with FORGE_GPU_GRAPH=0 FORGE_GPU_FUSED=0 and
#      with FORGE_GPU_GEMM_MIN=2
#   4. compute-sanitizer memcheck over the op parts, as far as the time budget (BUDGET, 570 s)
#      goes (a skipped step says so)
# Usage: bash scripts/gpu-archs-run.sh [DIR [MODELS]]   DIR: from scripts/gpu-archs-prep.sh
#   (default .dev/gpu-archs); MODELS: a directory with stories260K.gguf for test_gpu_paged
#   (skipped without it). Prints one line per step and "gpu-archs: N failing step(s)".
set -uo pipefail
D=${1:-.dev/gpu-archs}
MODELS=${2:-}
OUT=${OUT:-/tmp/gpu-archs-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$D/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FORGE_GPU_LIB="$PWD/$D/libforge_cuda.so"
BUDGET=${BUDGET:-570} # seconds this script may take in all (a device call allows 600)
source "$(dirname "$0")/gpu-lib.sh"
gpu_find_cublas "$D/libforge_cuda.so"
T=$D/tests/gpu
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_log archs 240 "$T/test_gpu_archs"
for t in test_gpu_attn2 test_gpu_fattn test_gpu_fused test_gpu_ops; do
    [ -x "$T/$t" ] && run_log "$t" 120 "$T/$t"
done
[ -n "$MODELS" ] && [ -x "$T/test_gpu_paged" ] && run_log test_gpu_paged 180 "$T/test_gpu_paged" "$MODELS"
FORGE_GPU_SYNC=1 run_log archs-sync 180 "$T/test_gpu_archs"
FORGE_GPU_GRAPH=0 FORGE_GPU_FUSED=0 run_log archs-unfused 120 "$T/test_gpu_archs" models
FORGE_GPU_GEMM_MIN=2 run_log archs-gemm2 120 "$T/test_gpu_archs" models
export FORGE_GPU_TEST_UNDER_SANITIZER=1
for part in moe ops attn; do
    run_log "cs-memcheck-$part" 200 $CS --tool memcheck --error-exitcode 9 "$T/test_gpu_archs" $part
done
echo "gpu-archs: $fails failing step(s) in ${SECONDS}s"
exit $((fails > 0))
