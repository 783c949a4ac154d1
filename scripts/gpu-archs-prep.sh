#!/usr/bin/env bash
# gpu-archs-prep.sh - gather what scripts/gpu-archs-run.sh needs on the GPU machine into one
# small directory (carried by the device call; the whole build/ is larger than a carry allows):
#   DIR/libforge_cuda.so, DIR/tests/gpu/<test programs>, DIR/lib/<shared libraries the machine
#   may lack>. Build first: make -j2 gpu (or the targets of the programs below).
# Usage: bash scripts/gpu-archs-prep.sh [BUILD] [DIR]   (defaults: build .dev/gpu-archs)
set -euo pipefail
B=${1:-build}
D=${2:-.dev/gpu-archs}
PROGS="test_gpu_archs test_gpu_attn2 test_gpu_fattn test_gpu_ops test_gpu_fused test_gpu_paged"
rm -rf "$D"
mkdir -p "$D/tests/gpu" "$D/lib"
cp "$B/libforge_cuda.so" "$D/"
for p in $PROGS; do
    [ -x "$B/tests/gpu/$p" ] && cp "$B/tests/gpu/$p" "$D/tests/gpu/"
done
# the non-glibc libraries the programs load (cjson, utf8proc, pcre2 ...), in case the machine
# lacks them; not CUDA's (the machine has its own; gpu-archs-run.sh finds cuBLAS)
for p in "$D"/tests/gpu/*; do
    ldd "$p" | awk '/=> \// {print $3}' |
        grep -vE '/(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|libforge_cuda|libcublas|libcublasLt|libcudart|libcuda)\.so' || true
done | sort -u | while read -r lib; do cp -L "$lib" "$D/lib/"; done
du -sh "$D"
