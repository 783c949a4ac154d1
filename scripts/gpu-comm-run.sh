#!/usr/bin/env bash
# gpu-comm-run.sh - the NCCL communicator of issue 16 on the GPU machine, logs to $OUT:
#   1. test_gpu_comm on every GPU there (one rank always; 2 and all GPUs when there are that many)
#   2. bench_gpu_comm: all-reduce and vocabulary-gather times per call (1 rank, 2, all GPUs)
#   3. compute-sanitizer (memcheck with leak check, racecheck, synccheck) over test_gpu_comm
#      --quick on one GPU (CUDA_VISIBLE_DEVICES=0: the one-rank paths, copy and NCCL)
# NCCL: $FORGE_NCCL_LIB when set, else libnccl.so.2 of the pip package nvidia-nccl-cu13 (its lib/
# is put first on LD_LIBRARY_PATH), else whatever the loader finds. NCCL_NVLS_ENABLE=0 is exported:
# NVLink multicast must stay off on the lent machines (a program using it can put the host's
# shared GPUs out of service; gpu_comm_create sets it too, when the environment has not).
# Usage: bash scripts/gpu-comm-run.sh [BUILD [STAGES]]
#   BUILD: the build dir of `make gpu` (libforge_cuda.so, tests/gpu/test_gpu_comm,
#   bench/gpu/bench_gpu_comm); default build.
#   STAGES: any of "test bench memcheck racecheck synccheck" (default: all; at most ~9.5 min).
# Prints one line per step; exit 1 when a step failed.
set -uo pipefail
B=${1:-build}
STAGES=${2:-test bench memcheck racecheck synccheck}
OUT=${OUT:-/tmp/gpu-comm-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
pydir() { # the lib/ directory of a pip package of NVIDIA's (python3 module name)
    python3 -c "import $1, os; print(os.path.join(list($1.__path__)[0], 'lib'))" 2>/dev/null
}
if ldd "$B/libforge_cuda.so" | grep -q "not found"; then
    d=$(pydir nvidia.cublas)
    [ -n "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ -z "${FORGE_NCCL_LIB:-}" ]; then
    d=$(pydir nvidia.nccl)
    if [ -n "$d" ] && [ -f "$d/libnccl.so.2" ]; then
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "NCCL: $d/libnccl.so.2"
    else
        echo "NCCL: no pip package nvidia-nccl-*; relying on the loader's path"
    fi
else
    echo "NCCL: FORGE_NCCL_LIB=$FORGE_NCCL_LIB"
fi
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1
CS=compute-sanitizer
command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
T=$B/tests/gpu/test_gpu_comm
bad=0
step() { # NAME TIMEOUT CMD...: run, keep the log, print its summary lines
    local name=$1 to=$2
    shift 2
    local t0=$SECONDS
    timeout "$to" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && bad=$((bad + 1))
    printf '%-24s rc=%-3d %4ds | %s\n' "$name" $rc $((SECONDS - t0)) \
        "$(grep -E 'passed|ERROR SUMMARY|LEAK SUMMARY|FATAL' "$OUT/$name.log" | tail -2 | tr '\n' ' ')"
    grep -E "^FAIL|FAIL$|FAIL \(" "$OUT/$name.log" | head -8
}
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has test; then
    step test_gpu_comm 120 "$T"
    grep -E "GPU|ok$" "$OUT/test_gpu_comm.log" | head -40
fi
if has bench; then
    step bench_gpu_comm 120 "$B/bench/gpu/bench_gpu_comm"
    cat "$OUT/bench_gpu_comm.log"
fi
export CUDA_VISIBLE_DEVICES=0
# --report-api-errors no: NCCL probes optional driver entry points (cuGetProcAddress answers
# CUDA_ERROR_NOT_FOUND), which the default reporting counts as errors (NVIDIA/nccl#727); the
# test checks every call of its own, and kernel memory errors and leaks are still reported
CSO=(--report-api-errors no --error-exitcode 9)
has memcheck && step cs-memcheck 150 $CS --tool memcheck --leak-check full "${CSO[@]}" "$T" --quick
has racecheck && step cs-racecheck 90 $CS --tool racecheck "${CSO[@]}" "$T" --quick
has synccheck && step cs-synccheck 90 $CS --tool synccheck "${CSO[@]}" "$T" --quick
echo "gpu-comm: $bad failing step(s)"
exit $((bad > 0))
