#!/usr/bin/env bash
# gpu-profile.sh - per-kernel GPU time of a prompt pass and of decode steps (ncu), on the GPU
# machine, logs to $OUT. Usage: bash scripts/gpu-profile.sh BUILD FIXTURES
set -uo pipefail
B=${1:-build-gpu}
FX=${2:-.dev/fixtures-gpub}
OUT=${OUT:-/tmp/gpu-profile-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$FX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
F=$B/forge
if ldd "$B/libforge_cuda.so" | grep -q "not found"; then
    d=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null)
    [ -n "$d" ] && export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
fi
note() { echo "=== $* (t=${SECONDS}s)"; }
NCU=ncu
command -v $NCU >/dev/null || NCU=/usr/local/cuda/bin/ncu
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
note synth
"$F" synth --shape llama3.2-1b --type Q4_0 -o /tmp/m1b.gguf --force >/dev/null 2>&1 &
p1=$!
"$F" synth --shape llama2-7b --type Q4_0 -o /tmp/m7b.gguf --force >/dev/null 2>&1 &
p7=$!
wait $p1
note "1b bench"
"$F" bench -m /tmp/m1b.gguf -p 512 -n 128 -r 2 --device gpu 2>&1 | grep "^|"
prof() { # NAME COUNT ARGS...
    local name=$1 cnt=$2
    shift 2
    note "ncu $name"
    timeout 200 $NCU --clock-control none --metrics gpu__time_duration.sum --launch-count "$cnt" \
        --print-summary per-kernel "$@" >"$OUT/ncu-$name.log" 2>&1
    echo "rc=$?"
    grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum" "$OUT/ncu-$name.log" | paste - - |
        awk '{print}' | head -40
}
FORGE_GPU_GRAPH=0 prof 1b-tg 420 "$F" bench -m /tmp/m1b.gguf -p 0 -n 2 -r 1 --device gpu
prof 1b-pp 520 "$F" bench -m /tmp/m1b.gguf -p 512 -n 0 -r 1 --device gpu
wait $p7
note "7b bench"
"$F" bench -m /tmp/m7b.gguf -p 512 -n 128 -r 2 --device gpu 2>&1 | grep "^|"
prof 7b-pp 900 "$F" bench -m /tmp/m7b.gguf -p 512 -n 0 -r 1 --device gpu
FORGE_GPU_GRAPH=0 prof 7b-tg 700 "$F" bench -m /tmp/m7b.gguf -p 0 -n 2 -r 1 --device gpu
note done
