#!/usr/bin/env python3
"""check_refs.py - checks the folders make_hf_refs.py wrote (tests/data/hfref/<family>/) against
Forge and, where it can run the family, llama.cpp. Standard library only.

For each family folder: model.gguf reads back; ref_logits.f32 is [24 x n_vocab]; then
  * `forge eval --f32-math` on model.gguf vs ref_logits (NMSE <= --nmse, argmax agreement, max
    |diff|; with LongRoPE a context of the original length, see selftest.forge_ctx_args) and
    Forge's greedy continuation (`forge eval` on prompt + greedy ids: the argmax after each prefix)
    vs greedy_ids, when Forge runs the architecture (otherwise one INFO line); then the same with
    Forge's default math (NMSE <= --nmse-default), unless --f32-only;
  * on --device DEV (cpu, or gpu for the GPU backend);
  * with --llama-logits (or $LLAMA_LOGITS): llama.cpp c392e50 on an F32 copy of model.gguf (F16
    matmuls there round activations to F16) vs ref_logits, for the families it runs.
usage: check_refs.py [DIR=tests/data/hfref] [--forge build/forge] [--llama-logits PATH]
                     [--device cpu|gpu] [--nmse 1e-9] [--nmse-default 1e-5] [--f32-only]
                     [--family F ...]
The limits are issue 15's: NMSE <= 1e-9 with --f32-math, <= 1e-5 with the default math.
Exit 1 when a comparison that ran was over the limit.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gguf_write as gw  # noqa: E402
import selftest as st  # noqa: E402


def gguf_to_f32(src, dst):
    """A copy of src with every F16 tensor widened to F32 (metadata kept, file_type 0)."""
    kv, tensors = gw.read_gguf(src)
    w = gw.GGUFWriter()
    for k, (t, v) in kv.items():
        if k == "general.alignment":
            continue
        if k == "general.file_type":
            v = 0
        if t == gw.ARRAY:
            w.add_array(k, v[0], v[1])
        else:
            w.add(k, t, v)
    import struct
    for ti in tensors:
        vals = gw.tensor_values(src, ti)
        w.add_tensor(ti["name"], ti["ne"], gw.GGML_F32, struct.pack("<%df" % len(vals), *vals))
    w.write(dst)


def argmax(row):
    return max(range(len(row)), key=row.__getitem__)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", default="tests/data/hfref")
    ap.add_argument("--forge", default=os.environ.get("FORGE", "build/forge"))
    ap.add_argument("--llama-logits", default=os.environ.get("LLAMA_LOGITS"))
    ap.add_argument("--nmse", type=float, default=1e-9)
    ap.add_argument("--nmse-default", type=float, default=1e-5)
    ap.add_argument("--f32-only", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", action="append")
    args = ap.parse_args()
    fams = args.family or sorted(d for d in os.listdir(args.dir)
                                 if os.path.isfile(os.path.join(args.dir, d, "ref_tokens.json")))
    if not fams:
        print(f"check_refs: no reference folders under {args.dir}", file=sys.stderr)
        return 2
    ck = st.Checks()
    tmp = tempfile.TemporaryDirectory()
    for f in fams:
        d = os.path.join(args.dir, f)
        ref = json.load(open(os.path.join(d, "ref_tokens.json")))
        ids, greedy, V = ref["input_ids"], ref["greedy_ids"], ref["n_vocab"]
        model = os.path.join(d, "model.gguf")
        kv, _ = gw.read_gguf(model)
        want = st.read_f32(os.path.join(d, "ref_logits.f32"), V)
        ck.ok(len(want) == len(ids), f"{f}: ref_logits has {len(want)} rows of {V}")
        arch = kv["general.architecture"][1]

        def compare(who, path, limit):
            got = st.read_f32(path, V)
            e = st.nmse(got, want)
            agree = sum(argmax(a) == argmax(b) for a, b in zip(got, want))
            mx = max(abs(x - y) for a, b in zip(got, want) for x, y in zip(a, b))
            ck.ok(e <= limit, f"{f} ({arch}): {who} vs HF",
                  f"NMSE {e:.3e} (limit {limit:.0e}), max |diff| {mx:.3e}, argmax {agree}/{len(want)}")

        maths = [("--f32-math", args.nmse)] + ([] if args.f32_only else [(None, args.nmse_default)])
        for flag, limit in maths:
            who = f"forge {args.device} " + (flag or "default math")
            out = os.path.join(tmp.name, f + ".forge.f32")
            r = subprocess.run([args.forge, "eval", "-m", model, "--tokens", " ".join(map(str, ids + greedy)),
                                "--logits", out, "--device", args.device] + ([flag] if flag else []) +
                               st.forge_ctx_args(model), capture_output=True, text=True)
            if r.returncode != 0:
                msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"
                print(f"[   INFO   ] {f} ({arch}): Forge does not run it here ({who}): {msg}")
                break
            rows = st.read_f32(out, V)
            with open(out + ".prompt", "wb") as fo, open(out, "rb") as fi:
                fo.write(fi.read()[: len(ids) * V * 4])
            compare(who, out + ".prompt", limit)
            mine = [argmax(rows[len(ids) - 1 + i]) for i in range(len(greedy))]
            ck.ok(mine == greedy, f"{f} ({arch}): {who} greedy ids == HF's", f"{mine} vs {greedy}")
        if args.llama_logits and f in st.LLAMA_CPP_RUNS:
            f32 = os.path.join(tmp.name, f + ".f32.gguf")
            gguf_to_f32(model, f32)
            if f.startswith("phi3"):
                b = open(f32, "rb").read().replace(b"forge-hfref phi3", b"forge-hfref xxx3")
                open(f32, "wb").write(b)
            out = os.path.join(tmp.name, f + ".llama.f32")
            r = subprocess.run([args.llama_logits, "-m", f32, "-o", out, "-n", str(len(greedy))] +
                               [str(i) for i in ids], capture_output=True, text=True)
            if ck.ok(r.returncode == 0, f"{f} ({arch}): llama.cpp runs it", r.stderr.strip()[-200:]):
                compare("llama.cpp (F32 copy)", out, args.nmse_default)
                lg = json.loads(r.stdout.strip().splitlines()[-1]).get("greedy")
                ck.ok(lg == greedy, f"{f} ({arch}): llama.cpp greedy ids == HF's", f"{lg} vs {greedy}")
    print(f"check_refs: {ck.failed} check(s) failed" if ck.failed else "check_refs: all checks passed")
    return 1 if ck.failed else 0


if __name__ == "__main__":
    sys.exit(main())
