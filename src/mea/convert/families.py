"""Conversion is data: for each supported family, how its config maps to `MEAConfig` and how its
weights map to ours. All four families already use Llama's module names, so the weight table is the
identity plus MEA's additions (HLC at identity, no GroupNorm), which keeps the function unchanged."""

from __future__ import annotations

# family (config.model_type) -> MEAConfig fields that the family fixes or derives from its config
FAMILIES: dict[str, dict] = {
    "llama": {
        "attention_bias": lambda c: bool(getattr(c, "attention_bias", False)),
        "attention_out_bias": lambda c: bool(getattr(c, "attention_bias", False)),
        "mlp_bias": lambda c: bool(getattr(c, "mlp_bias", False)),
        "use_qk_norm": lambda c: False,
    },
    "mistral": {
        "attention_bias": lambda c: False,
        "attention_out_bias": lambda c: False,
        "mlp_bias": lambda c: False,
        "use_qk_norm": lambda c: False,
    },
    "qwen2": {  # q/k/v carry a bias, o does not
        "attention_bias": lambda c: True,
        "attention_out_bias": lambda c: False,
        "mlp_bias": lambda c: False,
        "use_qk_norm": lambda c: False,
    },
    "qwen3": {  # per-head RMSNorm of queries and keys
        "attention_bias": lambda c: bool(getattr(c, "attention_bias", False)),
        "attention_out_bias": lambda c: bool(getattr(c, "attention_bias", False)),
        "mlp_bias": lambda c: False,
        "use_qk_norm": lambda c: True,
        "qk_norm_eps": lambda c: c.rms_norm_eps,
    },
}

# fields copied as they are
SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "initializer_range")

# source weight name (regex) -> our name; every source weight must match exactly one row
WEIGHT_MAP: list[tuple[str, str]] = [
    (r"^model\.embed_tokens\.weight$", r"model.embed_tokens.weight"),
    (r"^model\.norm\.weight$", r"model.norm.weight"),
    (r"^lm_head\.weight$", r"lm_head.weight"),
    (r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$", r"model.layers.\1.\2.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$", r"model.layers.\1.self_attn.\2.\3"),
    (r"^model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", r"model.layers.\1.mlp.\2.\3"),
]
