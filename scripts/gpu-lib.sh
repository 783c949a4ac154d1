# gpu-lib.sh - shared by the device-call scripts (gpu-archs-run.sh, gpu-steps-run.sh); source it
# after setting OUT (log directory) and BUDGET (seconds the script may take in all).
#   gpu_find_cublas LIB   add the pip package's cuBLAS to LD_LIBRARY_PATH when LIB lacks it
#   gpu_run_start LIB   make $OUT, put $LIBS and LIB's cuBLAS on the library path, name the GPU
#   run_log NAME TIMEOUT CMD...   run CMD with its output in $OUT/NAME.log, one summary line
#       (rc, seconds, the last "passed"/"ERROR SUMMARY" line, failures); skipped (said) when
#       the budget is spent; a non-zero rc counts in $fails
#   CS   the compute-sanitizer command
fails=0
CS=compute-sanitizer
command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
gpu_find_cublas() {
    if ldd "$1" | grep -q "not found"; then
        local d
        d=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null)
        [ -n "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
}
# The start every device run script shares: $OUT made, $LIBS (the shared libraries the machine
# lacks, optional) and the cuBLAS of the build under test ($1: its libforge_cuda.so) on the
# library path, the GPU named.
gpu_run_start() {
    mkdir -p "$OUT"
    [ -n "${LIBS:-}" ] && export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    gpu_find_cublas "$1"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
}
run_log() {
    local name=$1 to=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ $left -lt 30 ]; then
        echo "$name: SKIPPED (time budget spent)"
        return
    fi
    [ "$to" -gt "$left" ] && to=$left
    local t0=$SECONDS
    timeout "$to" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-30s rc=%-3d %4ds | %s\n' "$name" $rc $((SECONDS - t0)) \
        "$(grep -E 'passed|ERROR SUMMARY' "$OUT/$name.log" | tail -1)"
    grep -E "^FAIL|FAIL$|FATAL|differ" "$OUT/$name.log" | head -12
    [ $rc -ne 0 ] && fails=$((fails + 1))
}
