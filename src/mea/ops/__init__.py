"""Pure tensor functions; each fast path has a readable reference beside it."""

from .attention import (
    absorbed_attention,
    absorbed_attention_reference,
    attention_reference,
    expanded_attention,
    grouped_attention,
)
from .hlc import HLC_INITS, fold_into_projection, init_hlc, mix_heads, mix_heads_reference
from .mixing import (
    KEY_MIXINGS,
    VALUE_MIXINGS,
    absorb_query,
    check_mixing,
    fold_mixing,
    init_mixing,
    mix,
    mix_pairs_reference,
    mixing_shape,
    read_values,
)
from .norm import inverse_rms, rms_norm, rms_norm_reference
from .rope import SUPPORTED_ROPE_TYPES, apply_rope, apply_rope_reference, rope_cos_sin, rope_inv_freq, rotate_half

__all__ = [
    "HLC_INITS",
    "KEY_MIXINGS",
    "VALUE_MIXINGS",
    "absorb_query",
    "check_mixing",
    "fold_mixing",
    "init_mixing",
    "mix",
    "mix_pairs_reference",
    "mixing_shape",
    "read_values",
    "rotate_half",
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
