#!/usr/bin/env bash
# gpu-tp-run.sh - tensor parallelism (issue 16) on the GPU machine, logs to $OUT. Run it with the
# build carried (build/forge, build/libforge_cuda.so):
#   greedy     forge run's greedy ids with --tp 1 and --tp 2 (when 2 GPUs are there) against no
#              --tp: stories260K (must be equal) and forge synth's tiny-gqa F16 / Q4_0 (random
#              weights: equal, or the first difference is printed with the step)
#   sanitize   compute-sanitizer memcheck (leak check) and racecheck over forge run --tp 1 on
#              stories260K (one rank, its collectives through NCCL: FORGE_GPU_COMM_NCCL1=1), and
#              memcheck over --tp 2 when possible
#   bench      forge bench tg128/pp512 of forge synth llama3-8b Q4_0 (and F16 with BENCH_F16=1)
#              without --tp and with --tp 2
# NCCL as scripts/gpu-comm-run.sh finds it (the pip package's lib/ first on LD_LIBRARY_PATH);
# NCCL_NVLS_ENABLE=0 is exported (the lent machines require NVLink multicast off).
# TP_DEVICE=cpu runs the greedy stage on CPU ranks instead (a check of this script anywhere).
# Usage: bash scripts/gpu-tp-run.sh [BUILD [STAGES]]   (default: build "greedy sanitize bench")
set -uo pipefail
B=${1:-build}
STAGES=${2:-greedy sanitize bench}
OUT=${OUT:-/tmp/gpu-tp-out}
DEV=${TP_DEVICE:-gpu}
F=$B/forge
M=models/stories260K.gguf
SYN=${SYN_DIR:-/tmp/forge-tp-synth}
mkdir -p "$OUT" "$SYN"
export NCCL_NVLS_ENABLE=0
pydir() { python3 -c "import $1, os; print(os.path.join(list($1.__path__)[0], 'lib'))" 2>/dev/null; }
if [ "$DEV" = gpu ]; then
    for pkg in nvidia.cublas nvidia.nccl; do
        d=$(pydir $pkg)
        [ -n "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    n_gpu=$(nvidia-smi -L 2>/dev/null | wc -l)
else
    n_gpu=2
fi
echo "device $DEV, GPUs: $n_gpu"
CS=compute-sanitizer
command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
bad=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
ids_of() { # MODEL TP(0: none) N PROMPT -> the ids line, or the error
    local tpo=()
    [ "$2" -gt 0 ] && tpo=(--tp "$2")
    local ids
    ids=$("$F" run -m "$1" -p "$4" -n "$3" --temp 0 --ids --device "$DEV" -t 1 "${tpo[@]}" \
          2>"$OUT/err.txt" | sed -n 's/^ids: //p')
    [ -z "$ids" ] && tail -1 "$OUT/err.txt" >&2
    echo "$ids"
}
compare() { # NAME MODEL N PROMPT STRICT
    local ref got tp
    ref=$(ids_of "$2" 0 "$3" "$4")
    for tp in 1 2; do
        [ "$tp" -gt "$n_gpu" ] && continue
        got=$(ids_of "$2" $tp "$3" "$4")
        if [ -n "$ref" ] && [ "$got" = "$ref" ]; then
            echo "ok    $1 --tp $tp: $(echo "$got" | wc -w) ids equal"
        else
            local a=($ref) b=($got) i=0
            while [ $i -lt ${#a[@]} ] && [ "${a[$i]}" = "${b[$i]:-}" ]; do i=$((i + 1)); done
            echo "DIFF  $1 --tp $tp: first difference at id $i of ${#a[@]} (${a[$i]:-} vs ${b[$i]:-})"
            [ "$5" = strict ] && bad=$((bad + 1))
        fi
    done
}
if has greedy; then
    for p in "Once upon a time" "The little dog" "One day, a girl named"; do
        compare "stories260K '$p'" "$M" 64 "$p" strict
    done
    for t in F16 Q4_0; do
        s=$SYN/tiny-gqa-$t.gguf
        [ -f "$s" ] || "$F" synth --shape tiny-gqa --type $t -o "$s" >/dev/null 2>&1
        compare "tiny-gqa $t" "$s" 32 "hello" loose
    done
fi
if has sanitize && [ "$DEV" = gpu ]; then
    for tool in memcheck racecheck; do
        extra=()
        [ $tool = memcheck ] && extra=(--leak-check full)
        FORGE_GPU_COMM_NCCL1=1 timeout 300 $CS --tool $tool "${extra[@]}" --error-exitcode 9 \
            --report-api-errors no "$F" run -m "$M" -p "Once upon a time" -n 8 --temp 0 --device gpu --tp 1 \
            >"$OUT/cs-$tool-tp1.log" 2>&1
        rc=$?
        [ $rc -ne 0 ] && bad=$((bad + 1))
        echo "$tool --tp 1: rc=$rc $(grep -E 'ERROR SUMMARY|LEAK SUMMARY' "$OUT/cs-$tool-tp1.log" | tr '\n' ' ')"
    done
    if [ "$n_gpu" -ge 2 ]; then
        timeout 300 $CS --tool memcheck --error-exitcode 9 --report-api-errors no \
            "$F" run -m "$M" -p "Once upon a time" -n 8 --temp 0 --device gpu --tp 2 \
            >"$OUT/cs-memcheck-tp2.log" 2>&1
        rc=$?
        [ $rc -ne 0 ] && bad=$((bad + 1))
        echo "memcheck --tp 2: rc=$rc $(grep -E 'ERROR SUMMARY' "$OUT/cs-memcheck-tp2.log" | tr '\n' ' ')"
    fi
fi
if has bench && [ "$DEV" = gpu ]; then
    types="Q4_0"
    [ "${BENCH_F16:-0}" = 1 ] && types="Q4_0 F16"
    for t in $types; do
        s=$SYN/llama3-8b-$t.gguf
        [ -f "$s" ] || "$F" synth --shape llama3-8b --type $t -o "$s" >/dev/null 2>&1
        for tp in 0 2; do
            [ "$tp" -gt "$n_gpu" ] && continue
            tpo=()
            [ $tp -gt 0 ] && tpo=(--tp $tp)
            echo "== llama3-8b $t ${tpo[*]:-(no --tp)}"
            timeout 400 "$F" bench -m "$s" -p 512 -n 128 -r 2 --device gpu "${tpo[@]}" 2>&1 |
                tee -a "$OUT/bench.log" | grep -E "pp512|tg128|reads"
        done
    done
fi
echo "gpu-tp: $bad failing step(s)"
[ $bad -eq 0 ]
