#!/usr/bin/env python3
"""moe_pyref.py FORGE MODEL.gguf OUT.f32 ID...: an independent float64 forward (plain Python, no
dependencies) of a tiny mixture-of-experts model, Mixtral (llama arch) or qwen3moe, written from
Hugging Face's modeling_mixtral.py / modeling_qwen3_moe.py semantics (softmax router, top-k,
renormalised unless qwen3moe.expert_weights_norm is false); the tensors are read through
`forge inspect --tensor NAME --dump`. Writes the logits of every position like llama_logits.cpp.

It checks qwen3moe, which llama.cpp c392e50 does not know (no reference folder for it). Measured
2026-12-04 on the F32 synth files (seed 0) and make_ref.sh's 24 ids, with tests/test_archs.c-style
NMSE: this script vs llama.cpp on tiny-mixtral 4.7e-13 (so the script agrees with llama.cpp);
Forge --f32-math vs this script: tiny-mixtral 2.0e-13, tiny-qwen3moe 1.0e-13 (default math
2.1e-13), argmax 24/24 everywhere."""
import json, math, os, struct, subprocess, sys, tempfile

forge, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
ids = [int(x) for x in sys.argv[4:]]
meta = json.loads(subprocess.run([forge, "inspect", path, "--json", "--max-items", "0"],
                                 capture_output=True, text=True, check=True).stdout)
kv = {}
for k in meta.get("metadata", meta.get("kv", [])):
    kv[k["key"]] = k.get("value")
arch = kv["general.architecture"]
g = lambda s, d=None: kv.get(arch + "." + s, d)
D, L, H, KV = g("embedding_length"), g("block_count"), g("attention.head_count"), g("attention.head_count_kv")
HD = g("attention.key_length", D // H)
NE, K = g("expert_count"), g("expert_used_count")
eps, base = g("attention.layer_norm_rms_epsilon"), g("rope.freq_base", 10000.0)
n_rot = g("rope.dimension_count", HD)
norm_topk = g("expert_weights_norm", True)
tmp = tempfile.mkdtemp()

def tensor(name):
    p = os.path.join(tmp, "t.f32")
    r = subprocess.run([forge, "inspect", path, "--tensor", name, "--dump", p], capture_output=True)
    if r.returncode: return None
    b = open(p, "rb").read()
    return list(struct.unpack("<%df" % (len(b) // 4), b))

def mat(name, ne0):
    f = tensor(name)
    if f is None: return None
    return [f[i:i + ne0] for i in range(0, len(f), ne0)]

def mv(W, x): return [sum(a * b for a, b in zip(row, x)) for row in W]
def rms(x, w):
    s = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    return [v * s * ww for v, ww in zip(x, w)]
def silu(v): return v / (1.0 + math.exp(-v))

def rope(v, pos, neox):
    v = list(v)
    for i in range(n_rot // 2):
        th = pos * base ** (-2.0 * i / n_rot)
        c, s = math.cos(th), math.sin(th)
        a, b = (i, i + n_rot // 2) if neox else (2 * i, 2 * i + 1)
        v[a], v[b] = v[a] * c - v[b] * s, v[a] * s + v[b] * c
    return v

neox = arch != "llama"
emb = mat("token_embd.weight", D)
outw = mat("output.weight", D) or emb
V = len(outw)
xs = [list(emb[i]) for i in ids]
for il in range(L):
    p = "blk.%d." % il
    an, fn = tensor(p + "attn_norm.weight"), tensor(p + "ffn_norm.weight")
    Wq, Wk, Wv = mat(p + "attn_q.weight", D), mat(p + "attn_k.weight", D), mat(p + "attn_v.weight", D)
    Wo = mat(p + "attn_output.weight", H * HD)
    qn, kn = tensor(p + "attn_q_norm.weight"), tensor(p + "attn_k_norm.weight")
    Wr = mat(p + "ffn_gate_inp.weight", D)
    F = len(tensor(p + "ffn_down_exps.weight")) // (D * NE)
    G, U, Dn = mat(p + "ffn_gate_exps.weight", D), mat(p + "ffn_up_exps.weight", D), mat(p + "ffn_down_exps.weight", F)
    Q, Kc, Vc = [], [], []
    for t, x in enumerate(xs):
        h = rms(x, an)
        q, k, v = mv(Wq, h), mv(Wk, h), mv(Wv, h)
        qh = [q[i * HD:(i + 1) * HD] for i in range(H)]
        kh = [k[i * HD:(i + 1) * HD] for i in range(KV)]
        if qn: qh = [rms(a, qn) for a in qh]; kh = [rms(a, kn) for a in kh]
        Q.append([rope(a, t, neox) for a in qh]); Kc.append([rope(a, t, neox) for a in kh])
        Vc.append([v[i * HD:(i + 1) * HD] for i in range(KV)])
    new = []
    for t, x in enumerate(xs):
        att = []
        for hh in range(H):
            kvh = hh // (H // KV)
            sc = [sum(a * b for a, b in zip(Q[t][hh], Kc[s][kvh])) / math.sqrt(HD) for s in range(t + 1)]
            m = max(sc); e = [math.exp(s - m) for s in sc]; z = sum(e)
            att += [sum(e[s] / z * Vc[s][kvh][j] for s in range(t + 1)) for j in range(HD)]
        x = [a + b for a, b in zip(x, mv(Wo, att))]
        h = rms(x, fn)
        lg = mv(Wr, h); m = max(lg); pr = [math.exp(l - m) for l in lg]; z = sum(pr); pr = [v / z for v in pr]
        sel = sorted(range(NE), key=lambda e: (-lg[e], e))[:K]
        w = [pr[e] for e in sel]
        if norm_topk: s = sum(w); w = [v / s for v in w]
        y = [0.0] * D
        for e, we in zip(sel, w):
            gg, uu = mv(G[e * F:(e + 1) * F], h), mv(U[e * F:(e + 1) * F], h)
            a = [silu(p1) * p2 for p1, p2 in zip(gg, uu)]
            dd = mv(Dn[e * D:(e + 1) * D], a)
            y = [yy + we * d for yy, d in zip(y, dd)]
        new.append([a + b for a, b in zip(x, y)])
    xs = new
on = tensor("output_norm.weight")
with open(out, "wb") as f:
    for x in xs:
        f.write(struct.pack("<%df" % V, *mv(outw, rms(x, on))))
print(json.dumps({"arch": arch, "n_vocab": V, "norm_topk": norm_topk}))
