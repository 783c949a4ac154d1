#!/usr/bin/env bash
# gpu-tune.sh - decode tuning on the GPU machine: forge bench tg128 of llama3.2-1b / llama2-7b
# Q4_0 under variants of the FORGE_GPU_* switches, and an ncu per-kernel profile of decode steps.
# Usage: bash scripts/gpu-tune.sh DIR FIXTURES "ENV1;ENV2;..."   (logs to $OUT)
set -uo pipefail
B=${1:-build}
FX=${2:-.dev/fixtures-gpub}
VARIANTS=${3:-"X=1;FORGE_GPU_FMV_WAVE=0;FORGE_GPU_PDL=0"}
OUT=${OUT:-/tmp/gpu-tune-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$FX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
F=$B/forge
"$F" synth --shape llama3.2-1b --type Q4_0 -o /tmp/1b.gguf --force >/dev/null 2>&1 &
"$F" synth --shape llama2-7b --type Q4_0 -o /tmp/7b.gguf --force >/dev/null 2>&1 &
wait
IFS=';' read -ra vs <<<"$VARIANTS"
for m in 1b 7b; do
    for v in "${vs[@]}"; do
        printf '%s %-28s ' "$m" "$v"
        env $v "$F" bench -m /tmp/$m.gguf -p 0 -n 128 -r 3 --device gpu 2>&1 | grep tg128 | awk -F'|' '{print $8}'
    done
done
NCU=ncu
command -v $NCU >/dev/null || NCU=/usr/local/cuda/bin/ncu
for m in 1b 7b; do
    FORGE_GPU_GRAPH=0 timeout 120 $NCU --clock-control none --metrics gpu__time_duration.sum \
        --kernel-name regex:'^(?!k_weight_convert)' --launch-skip 200 --launch-count 400 \
        --print-summary per-kernel "$F" bench -m /tmp/$m.gguf -p 0 -n 8 -r 1 --device gpu \
        >"$OUT/ncu-$m.log" 2>&1
    grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum" "$OUT/ncu-$m.log" | paste - - |
        sed -E 's/\(const .*\) \(/ (/; s/Device 0, CC 9.0, //; s/gpu__time_duration.sum *//' | cut -c1-150
done
