#!/usr/bin/env python3
"""families.py - the tiny model of each family (Hugging Face config arguments), shared by
make_hf_refs.py (which builds them with transformers) and selftest.py (which builds the same
shapes from Python's random module). Standard library only.

Common: hidden 64, 4 heads, 2 KV heads, intermediate 192, vocab 512, 2 layers, max positions 512,
initializer_range 0.2, no pad token, bos 1, eos 2 (the synthetic vocabulary's). Per family the
values that make its features act on a 24-token prompt (see README.md for why each is there).

ABLATIONS: config changes that must move the logits (make_hf_refs.py runs the same weights with
each change and fails if the logits stay put): evidence that each feature is exercised.
"""

IDS = [1, 5, 9, 100, 200, 300, 17, 42, 77, 300, 301, 302, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
N_GREEDY = 16

_COMMON = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
               initializer_range=0.2, pad_token_id=None, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, attention_dropout=0.0, use_cache=False)


def _rope(theta):
    return {"rope_type": "default", "rope_theta": float(theta)}


FAMILIES = {
    "llama": dict(
        cls="LlamaForCausalLM", config_cls="LlamaConfig",
        config=dict(_COMMON, rms_norm_eps=1e-5, rope_parameters=_rope(10000), head_dim=16,
                    attention_bias=False, mlp_bias=False),
        notes="harness check: main's llama path; q/k rows permuted to rope NORM",
        ablations={}),
    "mixtral": dict(
        cls="MixtralForCausalLM", config_cls="MixtralConfig",
        config=dict(_COMMON, intermediate_size=96, rms_norm_eps=1e-5, rope_parameters=_rope(1e6),
                    head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                    router_jitter_noise=0.0, output_router_logits=False),
        notes="4 experts of 96, top-2, weights renormalised over the 2; llama arch",
        ablations={"top-1 instead of top-2": {"num_experts_per_tok": 1}}),
    "qwen3moe": dict(
        cls="Qwen3MoeForCausalLM", config_cls="Qwen3MoeConfig",
        config=dict(_COMMON, rms_norm_eps=1e-6, rope_parameters=_rope(1e6), head_dim=32,
                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                    sliding_window=None, use_sliding_window=False, attention_bias=False,
                    output_router_logits=False),
        notes="8 experts of 48, top-2 renormalised (norm_topk_prob, as llama.cpp's qwen3moe), "
              "head_dim 32 != 64/4, q/k norms",
        ablations={"top-2 weights not renormalised": {"norm_topk_prob": False}}),
    "gemma2": dict(
        cls="Gemma2ForCausalLM", config_cls="Gemma2Config",
        config=dict(_COMMON, num_hidden_layers=26, head_dim=32, query_pre_attn_scalar=32,
                    rms_norm_eps=1e-6, rope_parameters=_rope(10000), sliding_window=8,
                    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(26)],
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                    attention_bias=False),
        notes="26 layers (llama.cpp c392e50 picks gemma2's attention scale by layer count and "
              "aborts on others), even layers sliding (window 8), softcaps 2/3, head_dim 32, "
              "query_pre_attn_scalar = head_dim, tied output, norms stored as w (HF scales by 1+w)",
        ablations={"no sliding window": {"sliding_window": 4096},
                   "no attention softcap": {"attn_logit_softcapping": None},
                   "no final softcap": {"final_logit_softcapping": None}}),
    "gemma3": dict(
        cls="Gemma3ForCausalLM", config_cls="Gemma3TextConfig",
        config=dict(_COMMON, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                    rms_norm_eps=1e-6, sliding_window=8,
                    rope_parameters={"full_attention": _rope(1e6), "sliding_attention": _rope(2e4)},
                    layer_types=["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(6)],
                    attn_logit_softcapping=None, final_logit_softcapping=None,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                    attention_bias=False),
        notes="6 layers: 5 sliding (window 8, rope base 2e4, not the default 1e4, so that the GGUF key rope.freq_base_swa is exercised) + 1 global (rope base 1e6), q/k "
              "norms, head_dim 32, query_pre_attn_scalar = head_dim, tied output",
        ablations={"no sliding window": {"sliding_window": 4096},
                   "global layer made sliding": {"layer_types": ["sliding_attention"] * 6}}),
    "phi3": dict(
        cls="Phi3ForCausalLM", config_cls="Phi3Config",
        config=dict(_COMMON, rms_norm_eps=1e-5, rope_parameters=_rope(10000),
                    original_max_position_embeddings=512, sliding_window=8,
                    partial_rotary_factor=1.0, resid_pdrop=0.0, embd_pdrop=0.0),
        notes="fused qkv_proj and gate_up_proj, sliding window 8 on every layer (HF Phi3 applies "
              "config.sliding_window to all layers), 2 KV heads",
        ablations={"no sliding window": {"sliding_window": None}}),
    "phi3longrope": dict(
        cls="Phi3ForCausalLM", config_cls="Phi3Config",
        config=dict(_COMMON, rms_norm_eps=1e-5, max_position_embeddings=1024,
                    original_max_position_embeddings=512, sliding_window=None,
                    partial_rotary_factor=1.0, resid_pdrop=0.0, embd_pdrop=0.0,
                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 512,
                                     "short_factor": [1.0, 1.1, 1.25, 1.5, 1.8, 2.0, 2.5, 3.0],
                                     "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}),
        notes="LongRoPE: 1024 positions over an original 512, so attention factor "
              "sqrt(1 + ln 2 / ln 512); a 24-token prompt uses the short factors",
        ablations={}),
    "glm4": dict(
        cls="Glm4ForCausalLM", config_cls="Glm4Config",
        config=dict(_COMMON, rms_norm_eps=1e-5, rope_parameters=_rope(10000), head_dim=16,
                    partial_rotary_factor=0.5, attention_bias=True),
        notes="partial rotary (8 of 16 dims, interleaved pairs = rope NORM), q/k/v biases, fused "
              "gate_up_proj, sandwich norms (post_self_attn / post_mlp)",
        ablations={}),
    "chatglm": dict(
        cls="GlmForCausalLM", config_cls="GlmConfig",
        config=dict(_COMMON, rms_norm_eps=1e-5, rope_parameters=_rope(10000), head_dim=16,
                    partial_rotary_factor=0.5, attention_bias=True),
        notes="HF 'glm' (GLM-4-9B-0414's predecessor layout), llama.cpp arch chatglm: partial "
              "rotary 8 of 16, q/k/v biases, fused gate_up_proj",
        ablations={}),
}


def hf_param_shapes(family):
    """The state_dict names and shapes transformers 5 gives this family's tiny model (what
    selftest.py fills with random values): a list of (name, shape). MoE experts in the fused 3-D
    layout; tied models list lm_head.weight too (the state_dict holds the shared tensor twice)."""
    f = FAMILIES[family]
    c = f["config"]
    cls = f["cls"]
    H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or H // nh
    F = c["intermediate_size"]
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (H,)))
        if cls == "Phi3ForCausalLM":
            out.append((p + "self_attn.qkv_proj.weight", ((nh + 2 * nkv) * hd, H)))
        else:
            for n, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                out.append((p + f"self_attn.{n}_proj.weight", (rows, H)))
                if c.get("attention_bias"):
                    out.append((p + f"self_attn.{n}_proj.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (H, nh * hd)))
        if cls in ("Qwen3MoeForCausalLM", "Gemma3ForCausalLM"):
            out += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        out.append((p + "post_attention_layernorm.weight", (H,)))
        if cls in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
            out += [(p + "pre_feedforward_layernorm.weight", (H,)),
                    (p + "post_feedforward_layernorm.weight", (H,))]
        if cls == "Glm4ForCausalLM":
            out += [(p + "post_self_attn_layernorm.weight", (H,)), (p + "post_mlp_layernorm.weight", (H,))]
        if cls in ("MixtralForCausalLM", "Qwen3MoeForCausalLM"):
            E = c.get("num_local_experts") or c["num_experts"]
            Fe = c.get("moe_intermediate_size") or F
            out += [(p + "mlp.gate.weight", (E, H)), (p + "mlp.experts.gate_up_proj", (E, 2 * Fe, H)),
                    (p + "mlp.experts.down_proj", (E, H, Fe))]
        elif cls in ("Phi3ForCausalLM", "Glm4ForCausalLM", "GlmForCausalLM"):
            out += [(p + "mlp.gate_up_proj.weight", (2 * F, H)), (p + "mlp.down_proj.weight", (H, F))]
        else:
            out += [(p + "mlp.gate_proj.weight", (F, H)), (p + "mlp.up_proj.weight", (F, H)),
                    (p + "mlp.down_proj.weight", (H, F))]
    out.append(("model.norm.weight", (H,)))
    out.append(("lm_head.weight", (V, H)))
    return out


def is_norm(name):
    return name.endswith("norm.weight")


def is_gemma(family):
    return FAMILIES[family]["cls"] in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
