#!/usr/bin/env python3
"""make_hf_refs.py - Hugging Face references for every family in families.py (issue 15).

Needs torch and transformers (5.x; tested layout assumptions are checked, not trusted), no
network, no llama.cpp. For each family:
  1. build the tiny model from its config (families.py) with attn_implementation "eager", CPU;
  2. torch.manual_seed(0) and a torch.Generator seeded 0 fill every parameter in named_parameters()
     order: matrices N(0, 0.2) (HF's normal init at initializer_range 0.2), biases 0.1 N(0,1),
     norms 1 + 0.1 N(0,1) (gemma: 0.1 N(0,1), as HF gemma scales by 1 + w); then every parameter
     is rounded to float16 and back, so the F16 GGUF holds exactly the values HF computes with;
  3. float32 logits of all 24 positions of families.IDS (first id 1), 16 greedy ids (argmax, no
     EOS stop, full recompute each step), the float64 copy's largest logit difference;
  4. checks that the features act: each ablation in families.py (same weights, one config change)
     must move the logits; that the rope bases/dims in the GGUF are the ones HF's rotary
     embeddings use; that the config kept every value asked for; and reports whether
     selftest.py's torch-free float64 forward (pyref) reproduces transformers on these weights;
  5. convert.py writes model.gguf (2-D+ weights F16, 1-D F32, llama.cpp names and keys); then
     config.json, ref_tokens.json, ref_logits.f32 (float32 LE [24 x n_vocab]) beside it, and a
     README.md for the whole folder.
A family that fails is reported with its error and the others still run; exit status 1 if any
failed. Usage: python3 tests/hfref/make_hf_refs.py --out tests/data/hfref [--family F ...]
"""
import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convert as cv  # noqa: E402
import families as fam  # noqa: E402
import gguf_write as gw  # noqa: E402
import selftest as st  # noqa: E402

ABLATION_MIN_DIFF = 1e-3   # an ablation must move some logit by more than this
PYREF_NMSE_MAX = 1e-9      # pyref (float64) vs transformers (float32) on the same weights
# config values that transformers 5 may legitimately keep elsewhere (checked through the rotary
# embedding instead) or normalise
SOFT_KEYS = {"rope_parameters", "partial_rotary_factor", "original_max_position_embeddings",
             "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range",
             "attention_dropout", "resid_pdrop", "embd_pdrop", "output_router_logits"}


class RefError(Exception):
    pass


def log(msg):
    print(msg, flush=True)


def build(torch, transformers, spec, overrides=None):
    conf_cls = getattr(transformers, spec["config_cls"])
    model_cls = getattr(transformers, spec["cls"])
    kw = dict(spec["config"])
    kw.update(overrides or {})
    config = conf_cls(**kw)
    try:
        config._attn_implementation = "eager"
    except Exception:  # noqa: BLE001 - older/newer setters; checked below
        pass
    model = model_cls(config)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        raise RefError(f"attention implementation is {impl!r}, not 'eager'")
    return config, model.eval()


def check_config(config, spec):
    bad = []
    for k, v in spec["config"].items():
        if k in SOFT_KEYS:
            continue
        got = getattr(config, k, "<absent>")
        if isinstance(v, list):
            got = list(got) if isinstance(got, (list, tuple)) else got
        if got != v:
            bad.append(f"{k}: asked {v!r}, config has {got!r}")
    if bad:
        raise RefError("the config did not keep: " + "; ".join(bad))


def init_params(torch, model, gemma):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                v = (0.0 if gemma else 1.0) + 0.1 * r
            elif name.endswith(".bias"):
                v = 0.1 * r
            elif p.dim() >= 2:
                v = 0.2 * r
            else:
                raise RefError(f"parameter {name} {tuple(p.shape)}: no rule to initialise it")
            p.copy_(v.half().float())


def logits_of(torch, model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0]


def check_rope(torch, model, kv, arch, longrope):
    """Every rotary embedding's inv_freq must come from a (base, n_rot) the GGUF states."""
    n_rot = kv[f"{arch}.rope.dimension_count"][1]
    bases = {round(kv[f"{arch}.rope.freq_base"][1])}
    if f"{arch}.rope.freq_base_swa" in kv:
        bases.add(round(kv[f"{arch}.rope.freq_base_swa"][1]))
    seen = set()
    for name, buf in model.named_buffers():
        if not name.endswith("inv_freq") or "original" in name:
            continue
        inv = buf.detach().double().flatten().tolist()
        if 2 * len(inv) != n_rot:
            raise RefError(f"{name}: {len(inv)} frequencies, the GGUF's rope.dimension_count is {n_rot}")
        if longrope:
            continue
        base = inv[1] ** (-n_rot / 2.0)
        match = [b for b in bases if abs(base - b) <= 1e-3 * b]
        if not match:
            raise RefError(f"{name}: HF's rope base is {base:.6g}, the GGUF says {sorted(bases)}")
        seen.update(match)
    if not longrope and seen != bases:
        raise RefError(f"rope bases used by HF {sorted(seen)} != the GGUF's {sorted(bases)}")
    return sorted(seen)


def to_t(torch, t):
    t = t.detach().to(torch.float32).contiguous().cpu()
    return cv.T.from_bytes(tuple(t.shape), t.numpy().astype("<f4").tobytes())


def make_one(torch, transformers, family, out_dir):
    spec = fam.FAMILIES[family]
    gemma = fam.is_gemma(family)
    t0 = time.time()
    torch.manual_seed(0)
    config, model = build(torch, transformers, spec)
    check_config(config, spec)
    init_params(torch, model, gemma)
    if config.tie_word_embeddings:
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if emb.data_ptr() != head.data_ptr():
            raise RefError("tie_word_embeddings is set but lm_head does not share embed_tokens")
    ids = list(fam.IDS)
    l32 = logits_of(torch, model, ids).float()
    if not torch.isfinite(l32).all():
        raise RefError("non-finite logits")
    n_vocab = l32.shape[-1]
    # greedy continuation
    seq = list(ids)
    gaps = []
    for _ in range(fam.N_GREEDY):
        last = logits_of(torch, model, seq)[-1].float()
        top2 = torch.topk(last, 2)
        gaps.append(float(top2.values[0] - top2.values[1]))
        seq.append(int(top2.indices[0]))
    greedy = seq[len(ids):]
    full = logits_of(torch, model, seq).float()
    # float64
    f64_diff, f64_argmax, f64_err = None, None, None
    try:
        m64 = copy.deepcopy(model).double()
        l64 = logits_of(torch, m64, ids)
        f64_diff = float((l64 - l32.double()).abs().max())
        f64_argmax = int(l64[-1].argmax())
        del m64
    except Exception as e:  # noqa: BLE001 - reported, the float32 reference stands on its own
        f64_err = f"{type(e).__name__}: {e}"
    # ablations
    ablations = {}
    sd = model.state_dict()
    for desc, ov in spec["ablations"].items():
        torch.manual_seed(0)
        _, m2 = build(torch, transformers, spec, ov)
        missing, unexpected = m2.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RefError(f"ablation '{desc}': weights do not fit ({missing} {unexpected})")
        d = float((logits_of(torch, m2, ids).float() - l32).abs().max())
        ablations[desc] = d
        if not d > ABLATION_MIN_DIFF:
            raise RefError(f"ablation '{desc}' moves the logits by only {d:.3g}: the feature does not act")
    # convert
    os.makedirs(out_dir, exist_ok=True)
    gguf = os.path.join(out_dir, "model.gguf")
    cfg_dict = config.to_dict()
    state = {n: to_t(torch, t) for n, t in sd.items()}
    info = cv.convert(spec["cls"], cfg_dict, state, gguf, name=f"forge-hfref {family}", wtype="F16",
                      exact_f16=True, log=log)
    kv, tensors = gw.read_gguf(gguf)
    by_name = {t["name"]: t for t in tensors}
    embd = gw.tensor_values(gguf, by_name["token_embd.weight"])
    if embd != list(state["model.embed_tokens.weight"].data):
        raise RefError("token_embd.weight in the GGUF differs from HF's embed_tokens")
    rope_bases = check_rope(torch, model, kv, info["arch"],
                            cv.rope_params(cfg_dict).get("rope_type") in ("longrope", "su"))
    # selftest.py's pyref (the float64 forward that Forge and llama.cpp were checked against
    # without torch) on HF's own weights: agreement means pyref reads transformers right
    pyref_nmse, pyref_err = None, None
    try:
        ref64 = st.pyref(family, state, ids)
        pyref_nmse = st.nmse([[float(v) for v in row] for row in l32], ref64)
    except Exception as e:  # noqa: BLE001 - reported; HF stays the reference
        pyref_err = f"{type(e).__name__}: {e}"
    # files
    with open(os.path.join(out_dir, "ref_logits.f32"), "wb") as f:
        f.write(l32.cpu().numpy().astype("<f4").tobytes())
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(json.dumps(cfg_dict, indent=1, sort_keys=True, default=str) + "\n")
    top5 = []
    for row in l32:
        v, i = torch.topk(row, 5)
        top5.append({"ids": [int(x) for x in i], "logits": [float(x) for x in v]})
    srt = torch.sort(l32, dim=-1, descending=True).values
    pos_gaps = [float(x) for x in (srt[:, 0] - srt[:, 1])]
    last = l32[-1]
    ref = {
        "family": family, "arch": spec["cls"], "gguf_arch": info["arch"],
        "input_ids": ids, "greedy_ids": greedy,
        "argmax_per_position": [int(x) for x in l32.argmax(-1)],
        "argmax_full_sequence": [int(x) for x in full.argmax(-1)],
        "ref_logits_file": "ref_logits.f32", "ref_logits_positions": list(range(len(ids))),
        "ref_logits_shape": [len(ids), int(n_vocab)], "n_vocab": int(n_vocab),
        "top5_per_position": top5,
        "top2_gap_per_position": pos_gaps, "greedy_top2_gaps": gaps,
        "last_position_first8_logits": [float(x) for x in last[:8]],
        "last_position_stats": {"min": float(last.min()), "max": float(last.max()),
                                "mean": float(last.mean()), "std": float(last.std())},
        "f32_vs_f64_max_abs_diff_all_prompt_logits": f64_diff, "f64_last_position_argmax": f64_argmax,
        "f64_error": f64_err,
        "ablations_max_abs_logit_change": ablations, "rope_bases_checked": rope_bases,
        "pyref_vs_hf_nmse": pyref_nmse, "pyref_error": pyref_err,
        "seed_torch_manual_seed": 0, "seed_param_generator": 0,
        "init": "matrices 0.2 N(0,1), biases 0.1 N(0,1), norms 1 + 0.1 N(0,1) (gemma: 0.1 N(0,1)), "
                "named_parameters() order, one torch.Generator seeded 0; then float16 and back",
        "attn_implementation": "eager", "device": "cpu",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "notes": spec["notes"],
    }
    with open(os.path.join(out_dir, "ref_tokens.json"), "w") as f:
        f.write(json.dumps(ref, indent=1) + "\n")
    return {"family": family, "cls": spec["cls"], "arch": info["arch"], "tensors": len(info["tensors"]),
            "greedy": greedy, "f64": f64_diff, "f64_error": f64_err, "min_gap": min(pos_gaps + gaps),
            "ablations": ablations, "pyref": pyref_nmse, "pyref_error": pyref_err,
            "seconds": time.time() - t0, "notes": spec["notes"]}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def write_readme(out, results, torch, transformers):
    lines = [
        "# Hugging Face references for the issue-15 families",
        "",
        "Made by `python3 tests/hfref/make_hf_refs.py --out tests/data/hfref` (transformers "
        f"{transformers.__version__}, torch {torch.__version__}, CPU, eager attention); see "
        "tests/hfref/README.md for the method. Per folder: `model.gguf` (converted by "
        "tests/hfref/convert.py: llama.cpp's names and keys, 2-D+ weights F16 holding exactly the "
        "float16-rounded parameters, 1-D F32, synthetic byte vocabulary), `config.json` (the HF "
        "config), `ref_tokens.json` (input ids, 16 greedy ids, argmax/top-5/top-2 gap per position, "
        "float64 difference, ablations), `ref_logits.f32` (float32 LE [24 x n_vocab], every prompt "
        "position).",
        "",
        "| folder | HF class | GGUF arch | f32 vs f64 | min top-2 gap | greedy ids | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            continue
        f64 = f"{r['f64']:.2e}" if r["f64"] is not None else "n/a"
        lines.append(f"| {r['family']} | {r['cls']} | {r['arch']} | {f64} | {r['min_gap']:.4f} | "
                     f"{' '.join(map(str, r['greedy']))} | {r['notes']} |")
    lines += ["", "sha256:", "", "```"]
    for r in results:
        if "error" in r:
            continue
        for fn in ("config.json", "model.gguf", "ref_logits.f32", "ref_tokens.json"):
            p = os.path.join(out, r["family"], fn)
            lines.append(f"{sha256(p)}  {r['family']}/{fn}")
    lines += ["```", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/hfref")
    ap.add_argument("--family", action="append", choices=sorted(fam.FAMILIES))
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"make_hf_refs: needs torch and transformers ({e})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log(f"make_hf_refs: transformers {transformers.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}, out {args.out}")
    families = args.family or list(fam.FAMILIES)
    results = []
    for f in families:
        log(f"--- {f} ({fam.FAMILIES[f]['cls']})")
        try:
            r = make_one(torch, transformers, f, os.path.join(args.out, f))
            log(f"{f}: ok in {r['seconds']:.1f}s: {r['tensors']} tensors, greedy {r['greedy']}, "
                f"f32-vs-f64 {r['f64']}, min top-2 gap {r['min_gap']:.4f}, ablations "
                + ", ".join(f"{k}: {v:.3g}" for k, v in r["ablations"].items()))
            if r["f64_error"]:
                log(f"{f}: WARNING: the float64 run failed: {r['f64_error']}")
            if r["pyref_error"] or r["pyref"] is None or r["pyref"] > PYREF_NMSE_MAX:
                log(f"{f}: WARNING: selftest.py's pyref does not reproduce transformers here "
                    f"(NMSE {r['pyref']}, {r['pyref_error']}): the torch-free checks of this family "
                    "rest on a reading of transformers that this version does not follow")
            else:
                log(f"{f}: selftest.py's pyref reproduces transformers: NMSE {r['pyref']:.3e}")
        except Exception as e:  # noqa: BLE001 - one family's failure must not hide the others
            traceback.print_exc()
            r = {"family": f, "error": f"{type(e).__name__}: {e}"}
            log(f"{f}: FAILED: {r['error']}")
        results.append(r)
    os.makedirs(args.out, exist_ok=True)
    write_readme(args.out, results, torch, transformers)
    log("")
    log("summary:")
    for r in results:
        log(f"  {r['family']:13s} " + (f"FAILED  {r['error']}" if "error" in r else
                                       f"ok      greedy {' '.join(map(str, r['greedy']))}"))
    bad = [r["family"] for r in results if "error" in r]
    log(f"make_hf_refs: {len(results) - len(bad)} of {len(results)} families written"
        + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
