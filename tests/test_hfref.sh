#!/usr/bin/env bash
# test_hfref.sh - Forge against Hugging Face transformers for every issue-15 family, on the CPU:
# the references in tests/data/hfref (made on the GPU machine by tests/hfref/make_hf_refs.py;
# its README there says how) are checked by tests/hfref/check_refs.py: per family, the logits
# of the 24-token prompt with --f32-math (NMSE <= 1e-9) and with the default math (NMSE <= 1e-5),
# and the 16 greedy ids of transformers, each way. Also: every reference file still has the
# sha256 its README lists (nothing was regenerated or edited by hand without the README).
# The same check ran on the H200 with --device gpu (docs/PERFORMANCE.md, docs/GPU.md).
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
ref=$(dirname "$0")/data/hfref
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tu_require_cmd "hfref check" python3
(cd "$ref" && sed -n '/^```$/,/^```$/p' README.md | grep -E '^[0-9a-f]{64}  ' >"$tmp/sums")
tu_check "the README lists the sha256 of 36 reference files" [ "$(wc -l <"$tmp/sums")" -eq 36 ]
tu_check "every reference file has the sha256 its README lists" \
    bash -c "cd '$ref' && sha256sum --quiet -c '$tmp/sums'"
python3 "$(dirname "$0")/hfref/check_refs.py" "$ref" --forge "$FORGE" --device cpu >"$tmp/out.txt" 2>&1
rc=$?
sed 's/^/    /' "$tmp/out.txt"
tu_check "check_refs.py passes on the CPU" [ $rc -eq 0 ]
for f in llama mixtral qwen3moe gemma2 gemma3 phi3 phi3longrope glm4 chatglm; do
    for how in "--f32-math" "default math"; do
        tu_check "$f: forge cpu $how vs HF within the limit" grep -q "OK \] $f ([a-z0-9]*): forge cpu $how vs HF" "$tmp/out.txt"
        tu_check "$f: forge cpu $how greedy ids == HF's" grep -q "OK \] $f ([a-z0-9]*): forge cpu $how greedy ids == HF's" "$tmp/out.txt"
    done
done
tu_done
