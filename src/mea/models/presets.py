"""Named model shapes and the paper's attention variants, as plain dicts (torchtitan style)."""

from __future__ import annotations

from .configuration_mea import MEAConfig

PRESETS: dict[str, dict] = {
    # a few-second CPU model for tests and demos
    "tiny": dict(vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=3, head_dim=16, max_position_embeddings=2048,
                 rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # the smallest size of the scaling study: about 0.45M parameters (0.18M outside the embeddings), mini's vocabulary
    "micro": dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # the quick learning-rate study: about 1.3M parameters, 2k BPE vocabulary, ~6k tokens/s per CPU core
    "mini": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=2048,
                 rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # between mini and small, with mini's vocabulary (comparable losses): about 3.2M parameters (2.4M outside the embeddings)
    "midi": dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=24, max_position_embeddings=2048,
                 rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # laptop-scale pretraining (about 10M parameters with an 8k vocabulary)
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # the shape of SmolLM2-135M (the embedded real model): 9 query heads, 3 KV heads
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100_000.0}),
    # the larger size of the GPU scaling study: about 32M parameters with small's 8k vocabulary
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                   rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # the paper's from-scratch shape: Llama-3.2-1B without weight tying
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                        tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0}),
}

# The variants the paper compares, as switches on one attention class ("diff": the Differential
# Transformer baseline, DFA in the paper, with its own per-head RMSNorm).
VARIANTS: dict[str, dict] = {
    "baseline": dict(mea_hlc=False, mea_head_norm=False),
    "groupnorm": dict(mea_hlc=False, mea_head_norm=True),
    "diff": dict(mea_hlc=False, mea_head_norm=True, mea_differential=True),
    "mea-no-groupnorm": dict(mea_hlc=True, mea_head_norm=False),
    "mea": dict(mea_hlc=True, mea_head_norm=True),
    # MEA with GroupNorm's weight initialised at 0.1, about the raw head outputs' RMS in the small presets, instead
    # of 1 (docs/findings.md: the default's 8-14x larger start costs recall and most of MEA's loss gap)
    "mea-gn0.1": dict(mea_hlc=True, mea_head_norm=True, mea_head_norm_init=0.1),
    # the same rule for any model: the weight set to the raw head outputs' RMS on the first training batch
    "mea-gn-measured": dict(mea_hlc=True, mea_head_norm=True, mea_head_norm_init="measured"),
}
PAPER_VARIANTS = ("baseline", "groupnorm", "diff", "mea-no-groupnorm", "mea")  # one architecture each


def make_config(preset: str = "tiny", variant: str = "mea", **overrides) -> MEAConfig:
    """An `MEAConfig` from a named preset and variant, with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    fields = {**PRESETS[preset], **VARIANTS[variant], **overrides}
    unknown = sorted(set(overrides) - set(MEAConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}")
    return MEAConfig(**fields)
