"""Pure tensor functions; each fast path has a readable reference beside it."""

from .attention import (
    absorbed_attention,
    absorbed_attention_reference,
    attention_reference,
    expanded_attention,
    grouped_attention,
)
from .hlc import HLC_INITS, fold_into_projection, init_hlc, mix_heads, mix_heads_reference
from .norm import inverse_rms, rms_norm, rms_norm_reference
from .rope import SUPPORTED_ROPE_TYPES, apply_rope, apply_rope_reference, rope_cos_sin, rope_inv_freq

__all__ = [
    "HLC_INITS",
    "SUPPORTED_ROPE_TYPES",
    "absorbed_attention",
    "absorbed_attention_reference",
    "apply_rope",
    "apply_rope_reference",
    "attention_reference",
    "expanded_attention",
    "fold_into_projection",
    "grouped_attention",
    "init_hlc",
    "inverse_rms",
    "mix_heads",
    "mix_heads_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
    "rope_inv_freq",
]
