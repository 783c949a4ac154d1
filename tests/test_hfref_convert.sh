#!/usr/bin/env bash
# test_hfref_convert.sh - tests/hfref (the GGUF writer and the HF->GGUF converter used to make the
# Hugging Face references) without torch: selftest.py builds each family's tiny model as a HF state_dict
# (Python's random module, float16 values), converts it, checks that `forge inspect` lists the
# converted tensors and that `forge eval` (F32 math) matches an independent float64 forward pass
# of the HF layout (NMSE <= 1e-9: the q/k rope permutation, names, shapes and merged experts are
# right) for every family Forge runs (llama, mixtral, qwen3moe, phi3 incl. LongRoPE, glm4,
# chatglm); gemma2/gemma3 convert and read back (and are compared once Forge runs them); the
# older one-Linear-per-expert layout converts to the same model; bad input fails cleanly.
source "$(dirname "$0")/lib.sh"
: "${FORGE:?FORGE must point at the forge binary}"
here=$(dirname "$0")/hfref
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tu_require_cmd "hfref selftest" python3

python3 "$here/selftest.py" --forge "$FORGE" --all >"$tmp/all.txt" 2>&1
rc=$?
sed 's/^/    /' "$tmp/all.txt"
tu_check "every family: selftest passes (convert, read back, inspect, eval where Forge runs it)" [ $rc -eq 0 ]
for f in llama mixtral qwen3moe phi3 phi3longrope glm4 chatglm gemma2 gemma3; do
    tu_check "$f: forge eval compared with the reference" grep -q "OK \] $f: forge eval == pyref" "$tmp/all.txt"
done
tu_check "every family: forge inspect compared" [ "$(grep -c 'OK \] [a-z0-9]*: forge inspect lists the converted tensors' "$tmp/all.txt")" -eq 9 ]

python3 "$here/selftest.py" --forge "$FORGE" --family mixtral --family qwen3moe --moe-layout per-expert >"$tmp/moe.txt" 2>&1
rc=$?
sed 's/^/    /' "$tmp/moe.txt"
tu_check "mixtral, qwen3moe from one tensor per expert: merged experts give the same logits" [ $rc -eq 0 ]

# the writer: every value type round-trips; bad input raises
tu_check "gguf_write: all value types round-trip, bad input rejected" python3 - "$here" "$tmp" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import gguf_write as gw
p = sys.argv[2] + "/kv.gguf"
w = gw.GGUFWriter()
vals = [("a.u8", gw.UINT8, 255), ("a.i8", gw.INT8, -128), ("a.u16", gw.UINT16, 65535),
        ("a.i16", gw.INT16, -32768), ("a.u32", gw.UINT32, 2**32 - 1), ("a.i32", gw.INT32, -2**31),
        ("a.f32", gw.FLOAT32, 1.5), ("a.bool", gw.BOOL, True), ("a.str", gw.STRING, "h\u00e9"),
        ("a.u64", gw.UINT64, 2**64 - 1), ("a.i64", gw.INT64, -2**63), ("a.f64", gw.FLOAT64, 0.1)]
for k, t, v in vals:
    w.add(k, t, v)
w.add_array("b.strs", gw.STRING, ["x", "", "yz"])
w.add_array("b.i32", gw.INT32, [1, -2, 3])
w.add_array("b.f32", gw.FLOAT32, [0.5, -1.0])
w.add_array("b.bool", gw.BOOL, [True, False])
w.add_tensor("t.f32", [3], gw.GGML_F32, b"\0" * 12)
w.add_tensor("t.f16", [5, 2], gw.GGML_F16, b"\1" * 20)
w.write(p)
kv, ts = gw.read_gguf(p)
for k, t, v in vals:
    assert kv[k] == (t, v), (k, kv[k], v)
assert kv["b.strs"] == (gw.ARRAY, (gw.STRING, ["x", "", "yz"]))
assert kv["b.i32"] == (gw.ARRAY, (gw.INT32, [1, -2, 3]))
assert kv["b.f32"] == (gw.ARRAY, (gw.FLOAT32, [0.5, -1.0]))
assert kv["b.bool"] == (gw.ARRAY, (gw.BOOL, [True, False]))
assert [(t["name"], t["ne"], t["type"]) for t in ts] == [("t.f32", [3], 0), ("t.f16", [5, 2], 1)]
assert all(t["offset"] % 32 == 0 for t in ts)
for bad in (lambda: w.add_u32("a.u8", 1), lambda: w.add_u8("c", 256), lambda: w.add_i32("d", 1.5),
            lambda: w.add_tensor("t.f32", [3], gw.GGML_F32, b"\0" * 12),
            lambda: w.add_tensor("u", [4], gw.GGML_F32, b"\0" * 12),
            lambda: w.add_tensor("v", [4], 8, b"\0" * 34), lambda: w.add_tensor("x" * 65, [1], 0, b"\0" * 4)):
    try:
        bad()
    except gw.GGUFError:
        continue
    raise AssertionError("accepted bad input")
PY
"$FORGE" inspect "$tmp/kv.gguf" >"$tmp/kv.txt" 2>&1
tu_check "forge inspect reads the writer's value types" bash -c "grep -Eq '^  a\.u64 +u64 +18446744073709551615$' '$tmp/kv.txt' &&
    grep -Eq '^  a\.i8 +i8 +-128$' '$tmp/kv.txt' && grep -Eq '^  b\.strs +arr\[str\] +\[\"x\", \"\", \"yz\"\]$' '$tmp/kv.txt' &&
    grep -Eq '^  t\.f16 +F16 +\[5, 2\] ' '$tmp/kv.txt'"

# the converter refuses what it does not understand, naming it
tu_check "convert: a left-over tensor is an error naming it" python3 - "$here" "$tmp" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import convert as cv, families as fam, selftest as st
sd = st.build_state_dict("llama")
sd["model.layers.0.self_attn.extra.weight"] = cv.T((2, 2), [0.0] * 4)
try:
    cv.convert("LlamaForCausalLM", fam.FAMILIES["llama"]["config"], sd, sys.argv[2] + "/x.gguf")
except cv.ConvertError as e:
    assert "model.layers.0.self_attn.extra.weight" in str(e), e
else:
    raise AssertionError("no error")
del sd["model.layers.0.self_attn.extra.weight"]
del sd["model.layers.1.mlp.up_proj.weight"]
try:
    cv.convert("LlamaForCausalLM", fam.FAMILIES["llama"]["config"], sd, sys.argv[2] + "/x.gguf")
except cv.ConvertError as e:
    assert "model.layers.1.mlp.up_proj.weight is missing" in str(e), e
else:
    raise AssertionError("no error")
try:
    cv.convert("BertModel", {}, sd, sys.argv[2] + "/x.gguf")
except cv.ConvertError as e:
    assert "BertModel is not supported" in str(e), e
else:
    raise AssertionError("no error")
sd = st.build_state_dict("llama")
sd["model.norm.weight"].data[0] = 0.1  # not a float16 value
try:
    cv.convert("LlamaForCausalLM", fam.FAMILIES["llama"]["config"], sd, sys.argv[2] + "/x.gguf")
except cv.ConvertError:
    raise AssertionError("1-D tensors are F32, any value is fine")
sd["model.layers.0.mlp.up_proj.weight"].data[0] = 0.1
try:
    cv.convert("LlamaForCausalLM", fam.FAMILIES["llama"]["config"], sd, sys.argv[2] + "/x.gguf")
except cv.ConvertError as e:
    assert "not exactly representable in F16" in str(e), e
else:
    raise AssertionError("no error")
PY
tu_done
