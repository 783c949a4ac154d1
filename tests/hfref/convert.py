#!/usr/bin/env python3
"""convert.py - Forge's own converter from a Hugging Face state_dict + config to GGUF, with the
tensor names, metadata keys and weight layouts llama.cpp uses (learned by reading llama.cpp's
convert_hf_to_gguf.py, gguf-py constants/tensor_mapping and src/llama-model.cpp, and
transformers' configuration_*/modeling_* files; no code taken from them). Standard library only.

    from convert import T, convert
    sd = {"model.embed_tokens.weight": T((512, 64), array('f', ...)), ...}   # HF names, HF shapes
    info = convert("LlamaForCausalLM", config_dict, sd, "model.gguf", name="forge-hfref llama")

A tensor T has .shape (HF order: outermost first, a Linear weight is (out, in)) and .data, an
array('f') of the float32 values in row-major order. GGUF stores ne = reversed(shape), so a HF
Linear weight (out, in) becomes ne [in, out] with the same bytes.

Families (HF class -> GGUF architecture):
  LlamaForCausalLM     llama     q/k rows permuted per head from HF's rotate-half layout to
                                 llama.cpp's rope NORM (adjacent pairs) layout
  MixtralForCausalLM   llama     + experts merged into 3-D ffn_{gate,up,down}_exps, router
                                 ffn_gate_inp, expert_count / expert_used_count
  Qwen3MoeForCausalLM  qwen3moe  q/k norms, experts merged, expert_feed_forward_length
  Gemma2ForCausalLM    gemma2    every *norm.weight + 1 (HF Gemma scales by 1 + w), post norms,
                                 softcaps, sliding_window, key_length/value_length
  Gemma3ForCausalLM    gemma3    as gemma2 (no softcaps) + q/k norms, rope.freq_base (global
                                 layers) and rope.freq_base_swa (local layers)
  Phi3ForCausalLM      phi3      fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up, LongRoPE
                                 factors -> rope_factors_long/short + rope.scaling.attn_factor
  Glm4ForCausalLM      glm4      partial rotary (n_rot = head_dim * factor), gate_up -> ffn_up,
                                 post_self_attn/post_mlp norms -> post_attention_norm/post_ffw_norm
  GlmForCausalLM       chatglm   q/k/v (+biases) kept separate, gate_up -> ffn_up, partial rotary
Both transformers layouts of MoE experts are accepted: one Linear per expert
(experts.N.{w1,w2,w3|gate_proj,up_proj,down_proj}.weight) and the fused 3-D parameters of
transformers 5 (experts.gate_up_proj (E, 2F, H), experts.down_proj (E, H, F)).

The vocabulary is synthetic (Forge's synth vocabulary): SentencePiece-style "llama" model, <unk>
<s> </s>, the 256 byte tokens, then <unused_N> up to the model's vocab size; bos 1, eos 2.
Every state_dict entry must be consumed; anything left over is an error (ConvertError).
"""
import math
import os
import re
import struct
import sys
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_write as gw  # noqa: E402


class ConvertError(Exception):
    pass


class T:
    """A float32 tensor: shape (outermost first) and an array('f') of its values."""

    def __init__(self, shape, data):
        self.shape = tuple(int(x) for x in shape)
        self.data = data if isinstance(data, array) and data.typecode == "f" else array("f", data)
        n = 1
        for x in self.shape:
            n *= x
        if len(self.data) != n:
            raise ConvertError(f"tensor of shape {self.shape} has {len(self.data)} values")

    @classmethod
    def from_bytes(cls, shape, raw):
        """raw: little-endian float32 bytes."""
        a = array("f")
        a.frombytes(raw)
        if sys.byteorder != "little":
            a.byteswap()
        return cls(shape, a)

    def numel(self):
        return len(self.data)


# ---- layout operations ------------------------------------------------------------------------

def _rows(t, r0, r1):
    """Rows r0..r1-1 along the first dimension."""
    inner = t.numel() // t.shape[0]
    return T((r1 - r0,) + t.shape[1:], t.data[r0 * inner:r1 * inner])


def _expert_rows(t, r0, r1):
    """Rows r0..r1-1 of every expert of a 3-D (E, R, C) tensor."""
    e, r, c = t.shape
    out = array("f")
    for i in range(e):
        base = i * r * c
        out.extend(t.data[base + r0 * c:base + r1 * c])
    return T((e, r1 - r0, c), out)


def _transpose_last2(t):
    """(E, A, B) -> (E, B, A)."""
    e, a, b = t.shape
    out = array("f", bytes(4 * t.numel()))
    src = t.data
    for i in range(e):
        base = i * a * b
        for x in range(a):
            row = base + x * b
            for y in range(b):
                out[base + y * a + x] = src[row + y]
    return T((e, b, a), out)


def _stack(ts):
    out = array("f")
    for t in ts:
        if t.shape != ts[0].shape:
            raise ConvertError(f"experts of different shapes {ts[0].shape} / {t.shape}")
        out.extend(t.data)
    return T((len(ts),) + ts[0].shape, out)


def permute_rope_norm(t, n_head):
    """HF's rotate-half rows (per head: x[j] pairs with x[j + d/2]) to llama.cpp's rope NORM rows
    (x[2j] pairs with x[2j+1]): new row h*d + 2j + s = old row h*d + s*d/2 + j. Works on weights
    (rows = outputs) and biases (1-D)."""
    rows = t.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ConvertError(f"cannot permute {rows} rows into {n_head} heads of even size")
    d = rows // n_head
    inner = t.numel() // rows
    out = array("f", bytes(4 * t.numel()))
    for h in range(n_head):
        for j in range(d // 2):
            for s in range(2):
                src = (h * d + s * (d // 2) + j) * inner
                dst = (h * d + 2 * j + s) * inner
                out[dst:dst + inner] = t.data[src:src + inner]
    return T(t.shape, out)


def _plus1(t):
    return T(t.shape, array("f", [v + 1.0 for v in t.data]))


# ---- config access ----------------------------------------------------------------------------

_REQUIRED = object()


def cfg(c, *names, default=_REQUIRED):
    for n in names:
        if n in c and c[n] is not None:
            return c[n]
    if default is _REQUIRED:
        raise ConvertError(f"config has none of {', '.join(names)}")
    return default


def rope_params(c, layer_type="full_attention"):
    """The rope parameters of one layer type: transformers 5 keeps them in rope_parameters (one
    dict, or one dict per layer type); older configs have rope_theta / rope_scaling at the top
    level. For "sliding_attention" only a per-layer-type entry counts ({} when there is none)."""
    rp = c.get("rope_parameters") or {}
    nested = isinstance(rp, dict) and any(isinstance(rp.get(k), dict)
                                          for k in ("full_attention", "sliding_attention"))
    if layer_type != "full_attention":
        return dict(rp.get(layer_type) or {}) if nested else {}
    out = dict(c.get("rope_scaling") or {})
    out.update(rp.get("full_attention") or {} if nested else rp)
    if "rope_theta" not in out and c.get("rope_theta") is not None:
        out["rope_theta"] = c["rope_theta"]
    if "rope_type" not in out and "type" in out:
        out["rope_type"] = out["type"]
    return out


def partial_rotary(c, default):
    rp = c.get("rope_parameters") or {}
    if isinstance(rp, dict) and rp.get("partial_rotary_factor") is not None:
        return float(rp["partial_rotary_factor"])
    return float(cfg(c, "partial_rotary_factor", default=default))


# ---- the synthetic vocabulary -----------------------------------------------------------------

def add_synth_vocab(w, n_vocab, add_bos=True):
    """Forge's synth vocabulary (src/synth/synth.c builtin_vocab): <unk>, <s>, </s>, <0x00>..<0xFF>
    (byte fallback), then <unused_N>; scores 0 for those first 259, -(i - 259) after."""
    if n_vocab < 259:
        raise ConvertError(f"vocab size {n_vocab} is below the 259 tokens of the byte vocabulary")
    toks, types, scores = [], [], []
    for i in range(n_vocab):
        if i == 0:
            toks.append("<unk>"); types.append(2)
        elif i == 1:
            toks.append("<s>"); types.append(3)
        elif i == 2:
            toks.append("</s>"); types.append(3)
        elif i < 259:
            toks.append("<0x%02X>" % (i - 3)); types.append(6)
        else:
            toks.append("<unused_%d>" % (i - 259)); types.append(5)
        scores.append(0.0 if i < 259 else -float(i - 259))
    w.add_str("tokenizer.ggml.model", "llama")
    w.add_str("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", gw.STRING, toks)
    w.add_array("tokenizer.ggml.scores", gw.FLOAT32, scores)
    w.add_array("tokenizer.ggml.token_type", gw.INT32, types)
    w.add_u32("tokenizer.ggml.unknown_token_id", 0)
    w.add_u32("tokenizer.ggml.bos_token_id", 1)
    w.add_u32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.add_bool("tokenizer.ggml.add_eos_token", False)


# ---- families ---------------------------------------------------------------------------------

ARCH_OF = {
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "Glm4ForCausalLM": "glm4",
    "GlmForCausalLM": "chatglm",
}

# state_dict entries that are not weights (buffers some versions save); ignored
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.original_inv_freq|embed_scale|"
                      r"\.long_inv_freq|\.short_inv_freq)$")


class _Out:
    """The GGUF being built: metadata through the writer, tensors collected with their kind."""

    def __init__(self, arch, wtype):
        self.arch = arch
        self.w = gw.GGUFWriter()
        self.wtype = wtype
        self.tensors = []  # (name, T, ggml type)

    def key(self, suffix, vtype, value):
        self.w.add(f"{self.arch}.{suffix}", vtype, value)

    def tensor(self, name, t, force_f32=False):
        ttype = gw.GGML_F32 if force_f32 or len(t.shape) < 2 else self.wtype
        self.tensors.append((name, t, ttype))


def _pack(name, t, ttype, exact_f16):
    if ttype == gw.GGML_F32:
        a = array("f", t.data)
        if sys.byteorder != "little":
            a.byteswap()
        return a.tobytes()
    try:
        raw = struct.pack("<%de" % t.numel(), *t.data)
    except OverflowError as e:
        raise ConvertError(f"{name}: a value does not fit in F16 ({e})")
    if exact_f16:
        back = struct.unpack("<%de" % t.numel(), raw)
        for i, (a, b) in enumerate(zip(t.data, back)):
            if a != b:
                raise ConvertError(f"{name}: value {a!r} at {i} is not exactly representable in F16 "
                                   "(round the model's parameters to float16 first)")
    return raw


def _common_keys(o, c, n_vocab, n_layer, n_ctx=None):
    U, F = gw.UINT32, gw.FLOAT32
    o.key("vocab_size", U, n_vocab)
    o.key("context_length", U, int(n_ctx if n_ctx is not None else cfg(c, "max_position_embeddings")))
    o.key("embedding_length", U, int(cfg(c, "hidden_size")))
    o.key("block_count", U, n_layer)
    o.key("feed_forward_length", U, int(cfg(c, "intermediate_size")))
    o.key("attention.head_count", U, int(cfg(c, "num_attention_heads")))
    o.key("attention.head_count_kv", U, int(cfg(c, "num_key_value_heads", "num_attention_heads")))
    o.key("attention.layer_norm_rms_epsilon", F, float(cfg(c, "rms_norm_eps")))


def convert(hf_arch, config, state_dict, out_path, name=None, wtype="F16", exact_f16=True, log=None):
    """Writes out_path; returns {"arch", "tensors": [(name, type, ne)], "keys": [...]}. Raises
    ConvertError on anything it does not understand (unknown class, missing or left-over tensors,
    shapes that do not fit the config)."""
    if hf_arch not in ARCH_OF:
        raise ConvertError(f"architecture {hf_arch} is not supported ({', '.join(ARCH_OF)})")
    if wtype not in ("F16", "F32"):
        raise ConvertError(f"weight type {wtype} is not supported (F16, F32)")
    arch = ARCH_OF[hf_arch]
    c = dict(config)
    o = _Out(arch, gw.GGML_F16 if wtype == "F16" else gw.GGML_F32)
    sd = dict(state_dict)
    used = set()

    def take(n, required=True):
        if n not in sd:
            if required:
                raise ConvertError(f"{hf_arch}: tensor {n} is missing")
            return None
        used.add(n)
        return sd[n]

    def expect(n, t, shape):
        if t.shape != tuple(shape):
            raise ConvertError(f"{hf_arch}: {n} has shape {t.shape}, the config says {tuple(shape)}")

    n_layer = int(cfg(c, "num_hidden_layers"))
    n_embd = int(cfg(c, "hidden_size"))
    n_head = int(cfg(c, "num_attention_heads"))
    n_kv = int(cfg(c, "num_key_value_heads", "num_attention_heads"))
    head_dim = int(cfg(c, "head_dim", default=n_embd // n_head))
    n_ff = int(cfg(c, "intermediate_size"))
    embd = take("model.embed_tokens.weight")
    n_vocab = embd.shape[0]
    if int(cfg(c, "vocab_size")) != n_vocab:
        raise ConvertError(f"embed_tokens has {n_vocab} rows, config vocab_size {c['vocab_size']}")
    expect("model.embed_tokens.weight", embd, (n_vocab, n_embd))
    gemma = arch in ("gemma2", "gemma3")
    fix = _plus1 if gemma else (lambda t: t)
    U, F, B = gw.UINT32, gw.FLOAT32, gw.BOOL

    # ---- metadata ----
    o.w.add_str("general.architecture", arch)
    o.w.add_str("general.name", name or f"forge-hfref {arch}")
    o.w.add_u32("general.file_type", 1 if wtype == "F16" else 0)
    rp = rope_params(c)
    rope_type = rp.get("rope_type", "default")
    theta = float(rp.get("rope_theta", 10000.0))
    n_ctx = int(cfg(c, "max_position_embeddings"))
    _common_keys(o, c, n_vocab, n_layer, n_ctx)
    if "head_dim" in c and c["head_dim"] is not None:
        o.key("attention.key_length", U, head_dim)
        o.key("attention.value_length", U, head_dim)
    if arch in ("llama", "qwen3moe", "gemma2", "gemma3"):
        n_rot = head_dim
    elif arch == "phi3":
        n_rot = int(partial_rotary(c, 1.0) * n_embd) // n_head
    else:  # glm4, chatglm: GLM rotates the first half of each head by default
        n_rot = int(head_dim * partial_rotary(c, 0.5))
    o.key("rope.dimension_count", U, n_rot)
    o.key("rope.freq_base", F, theta)
    if rope_type == "linear":
        o.key("rope.scaling.type", gw.STRING, "linear")
        o.key("rope.scaling.factor", F, float(cfg(rp, "factor")))
    elif rope_type not in ("default", "longrope", "su"):
        raise ConvertError(f"{hf_arch}: rope type {rope_type!r} is not supported here")
    if rope_type in ("longrope", "su") and arch != "phi3":
        raise ConvertError(f"{hf_arch}: LongRoPE is only converted for Phi3")

    if (hf_arch == "MixtralForCausalLM" and c.get("sliding_window")) or \
            (arch == "qwen3moe" and c.get("use_sliding_window")):
        raise ConvertError(f"{hf_arch}: a sliding window is set; llama.cpp's {arch} has none")
    moe = hf_arch in ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
    n_exp = n_used = n_ff_exp = 0
    if moe:
        n_exp = int(cfg(c, "num_local_experts", "num_experts"))
        n_used = int(cfg(c, "num_experts_per_tok"))
        n_ff_exp = int(cfg(c, "moe_intermediate_size")) if arch == "qwen3moe" else n_ff
        o.key("expert_count", U, n_exp)
        o.key("expert_used_count", U, n_used)
        if arch == "qwen3moe":
            o.key("expert_feed_forward_length", U, n_ff_exp)
            if c.get("norm_topk_prob") is not None:
                o.key("expert_weights_norm", B, bool(c["norm_topk_prob"]))
            if int(cfg(c, "decoder_sparse_step", default=1)) != 1 or cfg(c, "mlp_only_layers", default=[]):
                raise ConvertError("qwen3moe: dense layers between MoE layers are not converted "
                                   "(decoder_sparse_step 1, mlp_only_layers [] only)")
            if cfg(c, "shared_expert_intermediate_size", default=0):
                raise ConvertError("qwen3moe: shared experts are not converted")
    if gemma:
        if c.get("query_pre_attn_scalar") is not None and int(c["query_pre_attn_scalar"]) != head_dim:
            raise ConvertError(f"{hf_arch}: query_pre_attn_scalar {c['query_pre_attn_scalar']} != "
                               f"head_dim {head_dim}: llama.cpp scales attention by 1/sqrt(head_dim) "
                               "(except gemma 27B), the GGUF cannot say otherwise")
        o.key("attention.sliding_window", U, int(cfg(c, "sliding_window")))
        lt = c.get("layer_types")
        if arch == "gemma2":
            o.key("attn_logit_softcapping", F, float(cfg(c, "attn_logit_softcapping")))
            o.key("final_logit_softcapping", F, float(cfg(c, "final_logit_softcapping")))
            want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
        else:
            for k in ("attn_logit_softcapping", "final_logit_softcapping"):
                if c.get(k) is not None:
                    raise ConvertError(f"gemma3: {k} is set; llama.cpp's gemma3 has no soft-capping")
            want = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n_layer)]
            swa = rope_params(c, "sliding_attention")
            local = swa.get("rope_theta", c.get("rope_local_base_freq"))
            if local is None:
                raise ConvertError("gemma3: no rope theta for the sliding layers (rope_parameters"
                                   "['sliding_attention'] or rope_local_base_freq)")
            o.key("rope.freq_base_swa", F, float(local))
        if lt is not None and list(lt) != want:
            raise ConvertError(f"{hf_arch}: layer_types {lt} differ from llama.cpp's fixed pattern {want}")
    if arch == "phi3":
        o.key("rope.scaling.original_context_length", U,
              int(cfg(c, "original_max_position_embeddings", default=rp.get("original_max_position_embeddings", n_ctx))))
        o.key("attention.sliding_window", U, int(c.get("sliding_window") or 0))
    add_synth_vocab(o.w, n_vocab, add_bos=arch != "chatglm")

    # ---- global tensors ----
    o.tensor("token_embd.weight", embd)
    norm = take("model.norm.weight")
    expect("model.norm.weight", norm, (n_embd,))
    o.tensor("output_norm.weight", fix(norm))
    tied = bool(c.get("tie_word_embeddings", False))
    head = take("lm_head.weight", required=not tied)
    if head is not None:
        expect("lm_head.weight", head, (n_vocab, n_embd))
        if tied:
            if head.data != embd.data:
                raise ConvertError("tie_word_embeddings is set but lm_head differs from embed_tokens")
        else:
            o.tensor("output.weight", head)
    if arch == "phi3" and rope_type in ("longrope", "su"):
        orig = int(cfg(c, "original_max_position_embeddings", default=rp.get("original_max_position_embeddings", 0)))
        if not orig:
            raise ConvertError("phi3 LongRoPE: original_max_position_embeddings is missing")
        scale = n_ctx / orig
        attn_factor = rp.get("attention_factor")
        if attn_factor is None:
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        o.key("rope.scaling.attn_factor", F, float(attn_factor))
        for which in ("long", "short"):
            fac = rp.get(f"{which}_factor")
            if fac is None or len(fac) != n_rot // 2:
                raise ConvertError(f"phi3 LongRoPE: {which}_factor must have {n_rot // 2} values")
            o.tensor(f"rope_factors_{which}.weight", T((len(fac),), [float(x) for x in fac]))

    # ---- layers ----
    q_dim, kv_dim = n_head * head_dim, n_kv * head_dim
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."

        def tk(suffix, shape, required=True):
            t = take(p + suffix, required)
            if t is not None:
                expect(p + suffix, t, shape)
            return t

        def put(gname, t):
            if t is not None:
                o.tensor(b + gname, t)

        put("attn_norm.weight", fix(tk("input_layernorm.weight", (n_embd,))))
        # attention
        if arch == "phi3":
            put("attn_qkv.weight", tk("self_attn.qkv_proj.weight", (q_dim + 2 * kv_dim, n_embd)))
            put("attn_qkv.bias", tk("self_attn.qkv_proj.bias", (q_dim + 2 * kv_dim,), False))
        else:
            for proj, g, rows, heads in (("q", "attn_q", q_dim, n_head), ("k", "attn_k", kv_dim, n_kv),
                                         ("v", "attn_v", kv_dim, None)):
                wt = tk(f"self_attn.{proj}_proj.weight", (rows, n_embd))
                bs = tk(f"self_attn.{proj}_proj.bias", (rows,), False)
                if arch == "llama" and heads:
                    wt = permute_rope_norm(wt, heads)
                    bs = permute_rope_norm(bs, heads) if bs is not None else None
                put(g + ".weight", wt)
                put(g + ".bias", bs)
        if arch in ("qwen3moe", "gemma3"):
            put("attn_q_norm.weight", fix(tk("self_attn.q_norm.weight", (head_dim,))))
            put("attn_k_norm.weight", fix(tk("self_attn.k_norm.weight", (head_dim,))))
        put("attn_output.weight", tk("self_attn.o_proj.weight", (n_embd, q_dim)))
        put("attn_output.bias", tk("self_attn.o_proj.bias", (n_embd,), False))
        # norms around the feed-forward
        if gemma:
            put("post_attention_norm.weight", fix(tk("post_attention_layernorm.weight", (n_embd,))))
            put("ffn_norm.weight", fix(tk("pre_feedforward_layernorm.weight", (n_embd,))))
            put("post_ffw_norm.weight", fix(tk("post_feedforward_layernorm.weight", (n_embd,))))
        elif arch == "glm4":
            put("post_attention_norm.weight", tk("post_self_attn_layernorm.weight", (n_embd,)))
            put("ffn_norm.weight", tk("post_attention_layernorm.weight", (n_embd,)))
            put("post_ffw_norm.weight", tk("post_mlp_layernorm.weight", (n_embd,)))
        else:
            put("ffn_norm.weight", tk("post_attention_layernorm.weight", (n_embd,)))
        # feed-forward
        if moe:
            _moe_layer(hf_arch, sd, used, p, b, n_exp, n_ff_exp, n_embd, o, expect)
        elif arch in ("phi3", "glm4", "chatglm"):
            put("ffn_up.weight", tk("mlp.gate_up_proj.weight", (2 * n_ff, n_embd)))
            put("ffn_down.weight", tk("mlp.down_proj.weight", (n_embd, n_ff)))
        else:
            put("ffn_gate.weight", tk("mlp.gate_proj.weight", (n_ff, n_embd)))
            put("ffn_up.weight", tk("mlp.up_proj.weight", (n_ff, n_embd)))
            put("ffn_down.weight", tk("mlp.down_proj.weight", (n_embd, n_ff)))

    left = sorted(n for n in sd if n not in used and not _IGNORED.search(n))
    if left:
        raise ConvertError(f"{hf_arch}: {len(left)} tensors were not converted: {', '.join(left[:12])}"
                           + (" ..." if len(left) > 12 else ""))

    # ---- write ----
    # ffn_gate_inp (the router) stays F32 like llama.cpp's converter keeps it
    summary = []
    for tname, t, ttype in o.tensors:
        if tname.endswith("ffn_gate_inp.weight"):
            ttype = gw.GGML_F32
        ne = list(reversed(t.shape))
        o.w.add_tensor(tname, ne, ttype, _pack(tname, t, ttype, exact_f16))
        summary.append((tname, gw.TYPE_NAMES[ttype], ne))
    size = o.w.write(out_path)
    if log:
        log(f"convert: wrote {out_path}: {arch}, {len(summary)} tensors, {len(o.w.keys())} keys, {size} bytes")
    return {"arch": arch, "tensors": summary, "keys": o.w.keys(), "n_vocab": n_vocab, "bytes": size}


def _moe_layer(hf_arch, sd, used, p, b, n_exp, n_ff_exp, n_embd, o, expect):
    """Router + experts of one layer, from either transformers layout, to llama.cpp's merged 3-D
    tensors: ffn_gate_exps / ffn_up_exps (E, F, H) and ffn_down_exps (E, H, F) in HF order."""
    blocks = [m for m in ("mlp.", "block_sparse_moe.") if p + m + "gate.weight" in sd]
    if len(blocks) != 1:
        raise ConvertError(f"{hf_arch}: {p}: no (or two) router weights mlp.gate / block_sparse_moe.gate")
    m = p + blocks[0]
    router = sd[m + "gate.weight"]
    used.add(m + "gate.weight")
    expect(m + "gate.weight", router, (n_exp, n_embd))
    o.tensor(b + "ffn_gate_inp.weight", router, force_f32=True)
    fused_gu, fused_d = m + "experts.gate_up_proj", m + "experts.down_proj"
    if fused_gu in sd or fused_d in sd:
        gu, dn = sd.get(fused_gu), sd.get(fused_d)
        if gu is None or dn is None:
            raise ConvertError(f"{hf_arch}: {m}experts: gate_up_proj and down_proj must both be present")
        used.update((fused_gu, fused_d))
        if gu.shape == (n_exp, n_embd, 2 * n_ff_exp) and n_embd != 2 * n_ff_exp:
            gu = _transpose_last2(gu)  # stored (E, in, out)
        if dn.shape == (n_exp, n_ff_exp, n_embd) and n_embd != n_ff_exp:
            dn = _transpose_last2(dn)
        expect(fused_gu, gu, (n_exp, 2 * n_ff_exp, n_embd))
        expect(fused_d, dn, (n_exp, n_embd, n_ff_exp))
        gate, up = _expert_rows(gu, 0, n_ff_exp), _expert_rows(gu, n_ff_exp, 2 * n_ff_exp)
    else:
        names = ({"gate": "w1", "down": "w2", "up": "w3"} if p + blocks[0] + "experts.0.w1.weight" in sd
                 else {"gate": "gate_proj", "down": "down_proj", "up": "up_proj"})
        per = {}
        for role, hf in names.items():
            ts = []
            for e in range(n_exp):
                n = f"{m}experts.{e}.{hf}.weight"
                if n not in sd:
                    raise ConvertError(f"{hf_arch}: expert tensor {n} is missing")
                used.add(n)
                shape = (n_embd, n_ff_exp) if role == "down" else (n_ff_exp, n_embd)
                expect(n, sd[n], shape)
                ts.append(sd[n])
            per[role] = _stack(ts)
        gate, up, dn = per["gate"], per["up"], per["down"]
    o.tensor(b + "ffn_gate_exps.weight", gate)
    o.tensor(b + "ffn_up_exps.weight", up)
    o.tensor(b + "ffn_down_exps.weight", dn)
