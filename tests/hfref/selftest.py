#!/usr/bin/env python3
"""selftest.py - checks gguf_write.py and convert.py without torch (standard library only).

For each family asked for (default: llama): build the family's tiny model (families.py) as a
Hugging Face state_dict from Python's random module (values rounded to float16, in the
transformers 5 layout), compute its logits with pyref() below -- an independent float64
re-implementation of what transformers' modeling code computes, reading the HF layout directly --
then convert it with convert.py and check:
  * the GGUF reads back (gguf_write.read_gguf) with the converter's tensor list;
  * `forge inspect` lists exactly those tensors, types and shapes;
  * `forge eval --f32-math` logits == pyref (NMSE <= 1e-9) where Forge runs the architecture
    (required for FORGE_REQUIRED; for the others a clear "Forge cannot run it yet" line, or a
    comparison once it can);
  * with --llama-logits (or $LLAMA_LOGITS), for the families llama.cpp c392e50 runs: its logits
    on an F32 copy of the file == pyref (NMSE <= 1e-9; gemma: 1e-6, see NMSE_MAX_GGML_GELU), which
    checks the converter's names, keys and layouts against llama.cpp's own loader.
A layout mistake (q/k permutation, fused split, +1 norms, expert order) gives NMSE ~ 1.

usage: selftest.py [--family F ...|--all] [--forge build/forge] [--llama-logits PATH]
                   [--moe-layout fused|per-expert] [--wtype F16|F32] [--keep DIR]
Exit 0 when every check passed, 1 otherwise; prints one line per check.
"""
import argparse
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convert as cv  # noqa: E402
import families as fam  # noqa: E402
import gguf_write as gw  # noqa: E402

# what llama.cpp c392e50 can run (gemma2 only with 26 layers; phi3 with a patched general.name)
LLAMA_CPP_RUNS = {"llama", "mixtral", "gemma2", "phi3", "phi3longrope", "chatglm"}
FORGE_REQUIRED = {"llama", "mixtral", "qwen3moe", "phi3", "phi3longrope", "glm4", "chatglm"}  # Forge on main runs these
NMSE_MAX = 1e-9  # F32 arithmetic on the same F16-exact weights; a layout error gives ~1
# llama.cpp vs the gemma families: ggml's GELU is a table of F16 values (emulated in _gelu_ggml up
# to float32-vs-float64 rounding of the table entries); over gemma2's 26 layers that leaves
# NMSE ~6e-8 (5.6e-7 with the exact GELU)
NMSE_MAX_GGML_GELU = 1e-6


def f16(x):
    return struct.unpack("<e", struct.pack("<e", x))[0]


def build_state_dict(family, seed=0):
    """name -> convert.T in HF layout, values as make_hf_refs.py sets them: weights N(0, 0.2),
    biases 0.1 N(0,1), norms 1 + 0.1 N(0,1) (gemma: 0.1 N(0,1), HF adds the 1), all rounded to
    float16."""
    rng = random.Random(seed)
    sd = {}
    gem = fam.is_gemma(family)
    c = fam.FAMILIES[family]["config"]
    for name, shape in fam.hf_param_shapes(family):
        n = 1
        for s in shape:
            n *= s
        if name == "lm_head.weight" and c.get("tie_word_embeddings"):
            sd[name] = sd["model.embed_tokens.weight"]
            continue
        if fam.is_norm(name):
            vals = [(0.0 if gem else 1.0) + 0.1 * rng.gauss(0, 1) for _ in range(n)]
        elif name.endswith(".bias"):
            vals = [0.1 * rng.gauss(0, 1) for _ in range(n)]
        else:
            vals = [0.2 * rng.gauss(0, 1) for _ in range(n)]
        sd[name] = cv.T(shape, [f16(v) for v in vals])
    return sd


def _split_experts(family, sd):
    """The older transformers layout: one Linear per expert (Mixtral w1/w3/w2, Qwen gate/up/down)."""
    names = ("w1", "w3", "w2") if fam.FAMILIES[family]["cls"] == "MixtralForCausalLM" else \
        ("gate_proj", "up_proj", "down_proj")
    prefix = "block_sparse_moe." if names[0] == "w1" else "mlp."
    out = {}
    for n, t in sd.items():
        if n.endswith("mlp.experts.gate_up_proj"):
            e, r2, h = t.shape
            f = r2 // 2
            base = n[: -len("mlp.experts.gate_up_proj")] + prefix + "experts."
            for i in range(e):
                rows = t.data[i * r2 * h:(i + 1) * r2 * h]
                out[f"{base}{i}.{names[0]}.weight"] = cv.T((f, h), rows[: f * h])
                out[f"{base}{i}.{names[1]}.weight"] = cv.T((f, h), rows[f * h:])
        elif n.endswith("mlp.experts.down_proj"):
            e, h, f = t.shape
            base = n[: -len("mlp.experts.down_proj")] + prefix + "experts."
            for i in range(e):
                out[f"{base}{i}.{names[2]}.weight"] = cv.T((h, f), t.data[i * h * f:(i + 1) * h * f])
        elif n.endswith("mlp.gate.weight"):
            out[n.replace("mlp.gate.weight", prefix + "gate.weight")] = t
        else:
            out[n] = t
    return out


# ---- the reference forward pass (transformers semantics, float64) -------------------------------

def _mat(t):
    c = t.shape[-1]
    d = t.data
    return [list(d[r * c:(r + 1) * c]) for r in range(t.numel() // c)]


def _mv(w, x):
    return [sum(a * b for a, b in zip(row, x)) for row in w]


def _rms(x, w, eps, plus1):
    s = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    return [v * s * ((1.0 + g) if plus1 else g) for v, g in zip(x, w)]


def _silu(x):
    return x / (1.0 + math.exp(-x)) if x > -700 else 0.0


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _gelu_ggml(x):
    """ggml's CPU GELU (GGML_GELU_FP16): a table of F16 results indexed by the F16 input; what
    llama.cpp computes, so the llama.cpp comparison of the gemma families can stay tight."""
    if x <= -10.0:
        return 0.0
    if x >= 10.0:
        return x
    return f16(_gelu_tanh(f16(x)))


def pyref(family, sd, ids, gelu=None):
    """Logits [len(ids)][n_vocab] of the HF model `family` with state_dict `sd` (HF layout).
    gelu: the GELU to use (default: the exact tanh form transformers' gelu_pytorch_tanh computes)."""
    f = fam.FAMILIES[family]
    c = f["config"]
    cls = f["cls"]
    H, L = c["hidden_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or H // nh
    eps = c["rms_norm_eps"]
    gem = cls in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
    glm = cls in ("Glm4ForCausalLM", "GlmForCausalLM")
    rp = c.get("rope_parameters") or {}
    partial = c.get("partial_rotary_factor", 0.5 if glm else 1.0)
    n_rot = int(hd * partial)
    M = {n: _mat(t) for n, t in sd.items() if len(t.shape) == 2}
    V = {n: list(t.data) for n, t in sd.items() if len(t.shape) == 1}
    X3 = {n: t for n, t in sd.items() if len(t.shape) == 3}

    def theta_of(layer):
        if "full_attention" in rp:
            lt = c["layer_types"][layer]
            return rp[lt]["rope_theta"]
        return rp["rope_theta"]

    ext, attn_factor = [1.0] * (n_rot // 2), 1.0
    if rp.get("rope_type") == "longrope":
        orig = c["original_max_position_embeddings"]
        scale = c["max_position_embeddings"] / orig
        ext = rp["long_factor"] if len(ids) > orig else rp["short_factor"]
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0

    def rope(v, pos, theta):
        """One head's vector; HF rotate_half on the first n_rot dims (GLM: interleaved pairs)."""
        out = list(v)
        half = n_rot // 2
        for j in range(half):
            inv = 1.0 / (ext[j] * theta ** (2.0 * j / n_rot))
            cs, sn = math.cos(pos * inv) * attn_factor, math.sin(pos * inv) * attn_factor
            a, b = (2 * j, 2 * j + 1) if glm else (j, j + half)
            out[a] = v[a] * cs - v[b] * sn
            out[b] = v[b] * cs + v[a] * sn
        return out

    emb = _mat(sd["model.embed_tokens.weight"])
    hs = [list(emb[t]) for t in ids]
    if gem:
        hs = [[v * math.sqrt(H) for v in h] for h in hs]
    scale = (c.get("query_pre_attn_scalar") or hd) ** -0.5
    softcap = c.get("attn_logit_softcapping") if cls == "Gemma2ForCausalLM" else None
    for il in range(L):
        p = f"model.layers.{il}."
        window = None
        if cls in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
            if c["layer_types"][il] == "sliding_attention":
                window = c["sliding_window"]
        elif cls == "Phi3ForCausalLM":
            window = c.get("sliding_window")
        theta = theta_of(il)
        qs, ks, vs = [], [], []
        for pos, h in enumerate(hs):
            x = _rms(h, V[p + "input_layernorm.weight"], eps, gem)
            if cls == "Phi3ForCausalLM":
                qkv = _mv(M[p + "self_attn.qkv_proj.weight"], x)
                q, k, v = qkv[:nh * hd], qkv[nh * hd:(nh + nkv) * hd], qkv[(nh + nkv) * hd:]
            else:
                q, k, v = (_mv(M[p + f"self_attn.{n}_proj.weight"], x) for n in "qkv")
                if c.get("attention_bias"):
                    q, k, v = ([a + b for a, b in zip(t, V[p + f"self_attn.{n}_proj.bias"])]
                               for t, n in ((q, "q"), (k, "k"), (v, "v")))
            qh = [q[i * hd:(i + 1) * hd] for i in range(nh)]
            kh = [k[i * hd:(i + 1) * hd] for i in range(nkv)]
            if p + "self_attn.q_norm.weight" in V:
                qh = [_rms(t, V[p + "self_attn.q_norm.weight"], eps, gem) for t in qh]
                kh = [_rms(t, V[p + "self_attn.k_norm.weight"], eps, gem) for t in kh]
            qs.append([rope(t, pos, theta) for t in qh])
            ks.append([rope(t, pos, theta) for t in kh])
            vs.append([v[i * hd:(i + 1) * hd] for i in range(nkv)])
        new = []
        for pos, h in enumerate(hs):
            att = []
            for i in range(nh):
                g = i // (nh // nkv)
                lo = 0 if window is None else max(0, pos - window + 1)
                sc = []
                for j in range(lo, pos + 1):
                    s = sum(a * b for a, b in zip(qs[pos][i], ks[j][g])) * scale
                    if softcap:
                        s = math.tanh(s / softcap) * softcap
                    sc.append(s)
                m = max(sc)
                e = [math.exp(s - m) for s in sc]
                z = sum(e)
                o = [0.0] * hd
                for w, j in zip(e, range(lo, pos + 1)):
                    for d in range(hd):
                        o[d] += w / z * vs[j][g][d]
                att += o
            a = _mv(M[p + "self_attn.o_proj.weight"], att)
            if gem:
                a = _rms(a, V[p + "post_attention_layernorm.weight"], eps, True)
            elif cls == "Glm4ForCausalLM":
                a = _rms(a, V[p + "post_self_attn_layernorm.weight"], eps, False)
            h = [u + w for u, w in zip(h, a)]
            if gem:
                x = _rms(h, V[p + "pre_feedforward_layernorm.weight"], eps, True)
            else:
                x = _rms(h, V[p + "post_attention_layernorm.weight"], eps, False)
            y = _ffn(f, c, p, x, M, X3, gelu)
            if gem:
                y = _rms(y, V[p + "post_feedforward_layernorm.weight"], eps, True)
            elif cls == "Glm4ForCausalLM":
                y = _rms(y, V[p + "post_mlp_layernorm.weight"], eps, False)
            new.append([u + w for u, w in zip(h, y)])
        hs = new
    head = M["lm_head.weight"] if "lm_head.weight" in M else emb
    out = []
    for h in hs:
        x = _rms(h, V["model.norm.weight"], eps, gem)
        lg = _mv(head, x)
        fc = c.get("final_logit_softcapping") if cls == "Gemma2ForCausalLM" else None
        if fc:
            lg = [math.tanh(v / fc) * fc for v in lg]
        out.append(lg)
    return out


def _ffn(f, c, p, x, M, X3, gelu):
    cls = f["cls"]
    act = (gelu or _gelu_tanh) if cls in ("Gemma2ForCausalLM", "Gemma3ForCausalLM") else _silu
    if cls in ("MixtralForCausalLM", "Qwen3MoeForCausalLM"):
        r = _mv(M[p + "mlp.gate.weight"], x)
        m = max(r)
        e = [math.exp(v - m) for v in r]
        z = sum(e)
        prob = [v / z for v in e]
        k = c["num_experts_per_tok"]
        top = sorted(range(len(prob)), key=lambda i: -prob[i])[:k]
        wsum = sum(prob[i] for i in top)
        norm = cls == "MixtralForCausalLM" or c.get("norm_topk_prob")
        gu, dn = X3[p + "mlp.experts.gate_up_proj"], X3[p + "mlp.experts.down_proj"]
        E, F2, H = gu.shape
        Fe = F2 // 2
        y = [0.0] * H
        for i in top:
            wgu = [list(gu.data[(i * F2 + r) * H:(i * F2 + r + 1) * H]) for r in range(F2)]
            wdn = [list(dn.data[(i * H + r) * Fe:(i * H + r + 1) * Fe]) for r in range(H)]
            g = _mv(wgu, x)
            hmid = [act(a) * b for a, b in zip(g[:Fe], g[Fe:])]
            o = _mv(wdn, hmid)
            w = prob[i] / wsum if norm else prob[i]
            y = [u + w * v for u, v in zip(y, o)]
        return y
    if cls in ("Phi3ForCausalLM", "Glm4ForCausalLM", "GlmForCausalLM"):
        g = _mv(M[p + "mlp.gate_up_proj.weight"], x)
        n = len(g) // 2
        hmid = [act(a) * b for a, b in zip(g[:n], g[n:])]
    else:
        g = _mv(M[p + "mlp.gate_proj.weight"], x)
        u = _mv(M[p + "mlp.up_proj.weight"], x)
        hmid = [act(a) * b for a, b in zip(g, u)]
    return _mv(M[p + "mlp.down_proj.weight"], hmid)


# ---- checks -----------------------------------------------------------------------------------

def forge_ctx_args(path):
    """Extra `forge eval` arguments for a file with LongRoPE factors: HF picks the short or long
    factors by the sequence's length (short up to original_max_position_embeddings), llama.cpp and
    Forge by the context size, so a context of the original length reproduces HF on a short
    prompt."""
    kv, tensors = gw.read_gguf(path)
    if not any(t["name"] == "rope_factors_short.weight" for t in tensors):
        return []
    arch = kv["general.architecture"][1]
    return ["-c", str(kv[f"{arch}.rope.scaling.original_context_length"][1])]


def nmse(a, b):
    num = sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    den = sum(y * y for rb in b for y in rb)
    return num / den


def read_f32(path, n_vocab):
    raw = open(path, "rb").read()
    v = struct.unpack("<%df" % (len(raw) // 4), raw)
    return [list(v[i:i + n_vocab]) for i in range(0, len(v), n_vocab)]


def parse_inspect(text):
    """The tensor table of `forge inspect`: {name: (type, [ne...])}."""
    out, on = {}, False
    for line in text.splitlines():
        if line.startswith("tensors:"):
            on = True
            continue
        if on and line.startswith("  ") and "[" in line and not line.strip().startswith("name "):
            parts = line.split()
            ne = json.loads(line[line.index("["):line.index("]") + 1])
            out[parts[0]] = (parts[1], ne)
    return out


class Checks:
    def __init__(self):
        self.failed = 0

    def ok(self, cond, what, detail=""):
        print(("[       OK ] " if cond else "[  FAILED  ] ") + what + (f": {detail}" if detail else ""),
              flush=True)
        if not cond:
            self.failed += 1
        return cond


def run_family(family, args, ck, tmp):
    c = fam.FAMILIES[family]["config"]
    ids = fam.IDS if family != "gemma2" else fam.IDS[:12]  # 26 layers in pure Python: keep it short
    sd = build_state_dict(family)  # pyref reads the fused layout; the converter gets either
    sd_in = _split_experts(family, sd) if args.moe_layout == "per-expert" else sd
    path = os.path.join(tmp, f"{family}.gguf")
    try:
        info = cv.convert(fam.FAMILIES[family]["cls"], c, sd_in, path, name=f"forge-hfref {family}",
                          wtype=args.wtype)
    except cv.ConvertError as e:
        ck.ok(False, f"{family}: convert", str(e))
        return
    ck.ok(True, f"{family}: convert", f"{info['arch']}, {len(info['tensors'])} tensors, {info['bytes']} bytes")
    kv, tensors = gw.read_gguf(path)
    ck.ok([t["name"] for t in tensors] == [t[0] for t in info["tensors"]] and
          kv["general.architecture"][1] == info["arch"],
          f"{family}: reads back (gguf_write.read_gguf)")
    ref = pyref(family, sd, ids)
    n_vocab = c["vocab_size"]
    ck.ok(all(math.isfinite(v) for r in ref for v in r), f"{family}: pyref logits finite",
          f"{len(ref)} x {n_vocab}")
    if args.forge:
        r = subprocess.run([args.forge, "inspect", path], capture_output=True, text=True)
        got = parse_inspect(r.stdout)
        want = {n: (t, ne) for n, t, ne in info["tensors"]}
        diff = sorted(n for n in set(got) | set(want)
                      if n not in got or n not in want or got[n] != (want[n][0], list(want[n][1])))
        ck.ok(r.returncode == 0 and not diff, f"{family}: forge inspect lists the converted tensors",
              f"rc {r.returncode}, {len(got)} tensors" + (f", differ: {diff[:6]}" if diff else ""))
        out = os.path.join(tmp, f"{family}.forge.f32")
        r = subprocess.run([args.forge, "eval", "-m", path, "--tokens", " ".join(map(str, ids)),
                            "--logits", out, "--device", "cpu", "--f32-math"] + forge_ctx_args(path),
                           capture_output=True, text=True)
        if r.returncode == 0:
            e = nmse(read_f32(out, n_vocab), ref)
            ck.ok(e <= NMSE_MAX, f"{family}: forge eval == pyref", f"NMSE {e:.3e}")
        elif family in FORGE_REQUIRED:
            ck.ok(False, f"{family}: forge eval", r.stderr.strip()[-300:])
        else:
            print(f"[   INFO   ] {family}: Forge cannot run it on this branch yet: "
                  f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'rc %d' % r.returncode}")
    if args.llama_logits and family in LLAMA_CPP_RUNS:
        # an F32 copy: llama.cpp rounds activations to F16 in F16 matmuls (NMSE ~1e-6), with F32
        # weights it computes in F32 throughout, so the comparison can be tight
        src = os.path.join(tmp, f"{family}.f32.gguf")
        cv.convert(fam.FAMILIES[family]["cls"], c, sd_in, src, name=f"forge-hfref {family}", wtype="F32")
        if family.startswith("phi3"):  # llama.cpp c392e50 wants Phi-3's special tokens then
            b = open(src, "rb").read().replace(b"forge-hfref phi3", b"forge-hfref xxx3")
            open(src, "wb").write(b)
        out = os.path.join(tmp, f"{family}.llama.f32")
        r = subprocess.run([args.llama_logits, "-m", src, "-o", out, "-n", "4"] + [str(i) for i in ids],
                           capture_output=True, text=True)
        if ck.ok(r.returncode == 0, f"{family}: llama.cpp loads and runs the file",
                 r.stderr.strip()[-300:] if r.returncode else r.stdout.strip()):
            ref_l, how, lim = ref, "pyref", NMSE_MAX
            if fam.is_gemma(family):
                ref_l = pyref(family, sd, ids, gelu=_gelu_ggml)
                how, lim = "pyref with ggml's F16-table GELU", NMSE_MAX_GGML_GELU
            e = nmse(read_f32(out, n_vocab), ref_l)
            ck.ok(e <= lim, f"{family}: llama.cpp (F32 copy) == {how}", f"NMSE {e:.3e} (limit {lim:g})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=sorted(fam.FAMILIES))
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--forge", default=os.environ.get("FORGE", "build/forge"))
    ap.add_argument("--llama-logits", default=os.environ.get("LLAMA_LOGITS"))
    ap.add_argument("--moe-layout", choices=("fused", "per-expert"), default="fused")
    ap.add_argument("--wtype", choices=("F16", "F32"), default="F16")
    ap.add_argument("--keep", help="write the files here instead of a temporary folder")
    args = ap.parse_args()
    families = sorted(fam.FAMILIES) if args.all else (args.family or ["llama"])
    if args.forge and not os.path.exists(args.forge):
        print(f"selftest: forge binary {args.forge} not found (FORGE / --forge)", file=sys.stderr)
        return 2
    ck = Checks()
    tmp_ctx = tempfile.TemporaryDirectory() if not args.keep else None
    tmp = args.keep or tmp_ctx.name
    os.makedirs(tmp, exist_ok=True)
    for f in families:
        run_family(f, args, ck, tmp)
    print(f"selftest: {ck.failed} check(s) failed" if ck.failed else "selftest: all checks passed")
    return 1 if ck.failed else 0


if __name__ == "__main__":
    sys.exit(main())
