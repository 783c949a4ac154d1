#!/usr/bin/env bash
# gpu-run.sh - what runs on the GPU machine: the op-by-op test, the stress test, the sanitizers
# (memcheck, racecheck, synccheck, initcheck) over the tests, and the bandwidth benchmark.
# Build first, here or there: `make BUILD=build-gpu gpu` (then carry build-gpu/libforge_cuda.so,
# build-gpu/tests/gpu and build-gpu/bench/gpu). Logs go to $OUT (or ./gpu-logs).
#   scripts/gpu-run.sh [BUILD_DIR]       steps: GPU_STEPS="test stress bench san" (default all)
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-gpu}
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
steps=${GPU_STEPS:-"test stress bench san"}
status=0
summary=()

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    ldd "$B/libforge_cuda.so"
} >"$OUT/env.log" 2>&1
if ldd "$B/libforge_cuda.so" | grep -q "not found"; then
    # cuBLAS not at the rpath: try the pip wheel's copy
    d=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null)
    [ -n "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cuBLAS from $d" >>"$OUT/env.log"
fi
head -3 "$OUT/env.log" | tail -2

run() { # name, log, timeout, command...
    local name=$1 log=$2 t=$3
    shift 3
    local t0=$SECONDS
    timeout "$t" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    summary+=("$(printf '%-44s rc=%-3d %4ds' "$name" "$rc" $((SECONDS - t0)))")
    [ $rc -ne 0 ] && status=1
    return 0
}

for s in $steps; do
    case $s in
    test)
        run "test_gpu_ops" ops.log 240 "$B/tests/gpu/test_gpu_ops"
        run "test_gpu_ops --quick, FORGE_GPU_SYNC=1" ops.log 120 \
            env FORGE_GPU_SYNC=1 "$B/tests/gpu/test_gpu_ops" --quick
        grep -E "FAIL|passed" "$OUT/ops.log" | tail -20 ;;
    stress)
        run "test_gpu_stress" stress.log 240 "$B/tests/gpu/test_gpu_stress"
        cat "$OUT/stress.log" ;;
    bench)
        run "bench_gpu_matvec" bench.log 240 "$B/bench/gpu/bench_gpu_matvec"
        echo "### FORGE_GPU_MATVEC2=0 (one row per segment everywhere)" >>"$OUT/bench1.log"
        run "bench_gpu_matvec, FORGE_GPU_MATVEC2=0" bench1.log 240 \
            env FORGE_GPU_MATVEC2=0 "$B/bench/gpu/bench_gpu_matvec" --tall ;;
    san)
        CS=compute-sanitizer
        command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
        for tool in memcheck racecheck synccheck initcheck; do
            extra=""
            [ $tool = memcheck ] && extra="--leak-check full"
            for prog in test_gpu_ops test_gpu_stress; do
                echo "### $tool $prog --quick" >>"$OUT/san.log"
                run "$tool $prog --quick" san.log 150 env FORGE_GPU_TEST_UNDER_SANITIZER=1 \
                    $CS --tool $tool $extra --error-exitcode 3 "$B/tests/gpu/$prog" --quick
                grep -E "ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|passed," "$OUT/san.log" | tail -2
            done
        done ;;
    esac
done
[ -f "$OUT/bench.log" ] && cat "$OUT/bench.log"
[ -f "$OUT/bench1.log" ] && grep -E "^(###|matvec)" "$OUT/bench1.log"
echo
printf '%s\n' "${summary[@]}"
exit $status
