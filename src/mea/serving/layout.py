"""How each layer of an MEA model maps onto a serving engine's paged attention (one KV head shape per layer).

A layer that caches its h composite heads (`CacheLayout.absorbed` False: h' = h, or no HLC) is plain GQA:
HLC is folded into k_proj / v_proj at load time and the engine caches h heads of width D.

A compressed layer (absorbed) is one multi-query head: its h'_K component keys, each rotated by RoPE as a
D-wide head, are concatenated into one KV head of width h'_K D; its values (h'_V components, or a latent of
width R) into one of width h'_V D (or R). Every query is absorbed through W_lc^K onto the concatenated keys
(`ops.mixing.absorb_query`) and keeps the softmax scale of a D-wide head; each head's output over the cached
values is read back through W_lc^V (`ops.mixing.read_values`) before GroupNorm and o_proj.

Engines whose kernels need one width for keys and values, or a width from a fixed list (vLLM's CPU attention:
32 to 256 and 512), get both padded with zeros: zero key features add nothing to q.k, zero value features
are dropped before W_lc^V, so the maths is unchanged and only the padding costs cache memory.

This module knows nothing of vLLM, so it is tested in the main environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..models.configuration_mea import MEAConfig


@dataclass(frozen=True)
class ServingLayer:
    """One layer as the engine sees it."""

    absorbed: bool  # one multi-query head over the components, else plain GQA over h composite heads
    num_kv_heads: int  # KV heads the engine caches (1 when absorbed)
    key_width: int  # features of one cached key head before padding (h'_K D, or D)
    value_width: int  # features of one cached value head before padding (h'_V D, R, or D)
    head_size: int  # the padded width the engine caches for keys and values

    @property
    def elements_per_token(self) -> int:
        """Cache elements per token the engine holds (keys + values, padding included)."""
        return 2 * self.num_kv_heads * self.head_size


def check_servable(config: MEAConfig) -> None:
    """ValueError, naming the setting, for MEA models no engine attention can compute exactly."""
    if config.mea_differential:
        raise ValueError("mea_differential=True (the Differential Transformer baseline) is not served: its two "
                         "softmax maps per head have no paged-attention equivalent; use transformers' generate")
    if config.use_qk_norm and any(layout.absorbed for layout in config.cache_layouts()):
        raise ValueError("a compressed model with QK-norm (Qwen3) is not served: the norm's 1/RMS of each composite "
                         "key multiplies the attention logits per head and token, which a paged-attention kernel "
                         "cannot apply; serve it with transformers' generate, or compress without QK-norm")


def padded_width(width: int, supported: Sequence[int] | None) -> int:
    """The smallest supported head size >= width (any width when `supported` is None)."""
    if supported is None:
        return width
    fits = [s for s in sorted(supported) if s >= width]
    if not fits:
        raise ValueError(f"a cached head of width {width} exceeds the engine's largest head size "
                         f"({max(supported)}); compress that layer to fewer components (or a smaller value latent)")
    return fits[0]


def serving_layers(config: MEAConfig, supported_head_sizes: Sequence[int] | None = None) -> list[ServingLayer]:
    """Every layer's engine shape; `supported_head_sizes`: the attention kernel's list (None: any width)."""
    check_servable(config)
    d = config.head_dim
    layers = []
    for layout in config.cache_layouts():
        if layout.absorbed:
            key_width, value_width = layout.key_shape[0] * d, layout.value_shape[0] * layout.value_shape[1]
            heads = 1
        else:
            key_width = value_width = d
            heads = config.num_key_value_heads
        size = padded_width(max(key_width, value_width), supported_head_sizes)
        layers.append(ServingLayer(absorbed=layout.absorbed, num_kv_heads=heads, key_width=key_width,
                                   value_width=value_width, head_size=size))
    return layers


def serving_elements_per_token(config: MEAConfig, supported_head_sizes: Sequence[int] | None = None) -> int:
    """Cache elements per token over all layers as the engine holds them (padding included)."""
    return sum(layer.elements_per_token for layer in serving_layers(config, supported_head_sizes))
