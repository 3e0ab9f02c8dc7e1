"""`MEAAttention`: grouped-query attention with Head-level Linear Composition (HLC) and GroupNorm.

One class gives the four variants the paper compares:
    hlc=False, head_norm=False   baseline GQA
    hlc=False, head_norm=True    + GroupNorm
    hlc=True,  head_norm=False   MEA without GroupNorm
    hlc=True,  head_norm=True    MEA

k_proj / v_proj produce h' component heads; HLC matrices W_lc^K, W_lc^V (h' x h) recombine them into
h composite heads. Component heads are cached after RoPE (RoPE commutes with head mixing).
Keys and values may have different component counts (h'_K, h'_V), and finer mixings (`ops.mixing`):
keys mixed with one complex weight per RoPE frequency pair ("rope_pair"), values read from a latent of
any width R ("latent"). Training and the uncached forward fold the mixing into k/v_proj.

QK-norm (Qwen3) is applied to the *composite* key heads, i.e. after mixing, which keeps an
identity-HLC conversion exact and lets HLC be folded into k_proj. The norm's per-feature scale and
RoPE commute with mixing, the 1/RMS factor does not: it is computed per token and composite head
when the token enters the cache (h floats per token) and applied to the attention logits, so the
compressed cache stays exact with QK-norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import CacheLayout, MEACache, cache_layout
from ..ops import (
    absorbed_attention,
    apply_rope,
    check_mixing,
    expanded_attention,
    fold_mixing,
    grouped_attention,
    init_mixing,
    inverse_rms,
    mix,
)
from ..ops.kvquant import KVQuant, QuantizedTokens
from ..ops.eager import eager_attention
from .norm import RMSNorm


class AttentionMap(nn.Module):
    """Passes the attention probabilities through unchanged: the point where `output_attentions=True` records
    them (a forward hook), so that the attention layer itself always returns one tensor."""

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return weights


def _float(k, v, layout: CacheLayout):
    """The cached keys and values as float tensors in the layout the float cache returns ((B, S, heads, features)):
    a quantized cache's `QuantizedTokens` dequantized whole (the eager path, which materialises probabilities
    anyway; decoding reads the codes block by block instead)."""
    if not isinstance(k, QuantizedTokens):
        return k, v
    k, v = k.dequantize(), v.dequantize()  # (B, G, S, E)
    if layout.heads_first:  # (B, h, S, D) -> (B, S, h, D)
        return k.transpose(1, 2), v.transpose(1, 2)
    b, s = k.shape[0], k.shape[2]
    return k.reshape(b, s, *layout.key_shape), v.reshape(b, s, *layout.value_shape)


class MEAAttention(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        num_component_heads: int | None = None,
        num_key_components: int | None = None,
        num_value_components: int | None = None,
        key_mixing: str = "head",
        value_mixing: str = "head",
        value_latent_dim: int | None = None,
        hlc: bool = True,
        head_norm: bool = True,
        head_norm_eps: float = 1e-5,
        head_norm_weight: bool = True,
        head_norm_init: float = 1.0,
        head_gain: bool = False,
        head_norm_blend: bool = False,
        hlc_init: str | None = None,
        hlc_k: torch.Tensor | None = None,
        hlc_v: torch.Tensor | None = None,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        out_bias: bool = False,
        kv_quant: KVQuant | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        # the shape and switches, to build a sibling layer (e.g. with fewer component heads)
        self.spec = dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         num_component_heads=num_component_heads, num_key_components=num_key_components,
                         num_value_components=num_value_components, key_mixing=key_mixing,
                         value_mixing=value_mixing, value_latent_dim=value_latent_dim, hlc=hlc, head_norm=head_norm,
                         head_norm_eps=head_norm_eps, head_norm_weight=head_norm_weight,
                         head_norm_init=head_norm_init, head_gain=head_gain, head_norm_blend=head_norm_blend,
                         qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, qkv_bias=qkv_bias, out_bias=out_bias,
                         kv_quant=kv_quant, layer_idx=layer_idx)
        head_dim = head_dim or hidden_size // num_heads
        num_component_heads = num_kv_heads if num_component_heads is None else num_component_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 1 <= num_component_heads <= num_kv_heads:
            raise ValueError(f"num_component_heads h' must be in [1, h={num_kv_heads}], got {num_component_heads}")
        m_k = num_component_heads if num_key_components is None else num_key_components
        m_v = num_component_heads if num_value_components is None else num_value_components
        check_mixing(num_kv_heads=num_kv_heads, head_dim=head_dim, key_components=m_k, value_components=m_v,
                     key_mixing=key_mixing, value_mixing=value_mixing, value_latent_dim=value_latent_dim, hlc=hlc,
                     qk_norm=qk_norm)
        self.num_heads, self.num_kv_heads, self.num_component_heads = num_heads, num_kv_heads, num_component_heads
        self.num_key_components, self.key_mixing, self.value_mixing = m_k, key_mixing, value_mixing
        self.num_value_components = m_v if value_mixing == "head" else None
        self.value_latent_dim = value_latent_dim if value_mixing == "latent" else None
        self.head_dim, self.scale, self.layer_idx = head_dim, head_dim**-0.5, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, m_k * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.value_latent_dim or m_v * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        self.hlc = hlc
        if hlc:
            for name, given, default in zip(("hlc_k", "hlc_v"), (hlc_k, hlc_v), self.initial_mixing(hlc_init)):
                w = default if given is None else torch.as_tensor(given, dtype=torch.float32).clone()
                if w.shape != default.shape:
                    raise ValueError(f"{name} must have shape {tuple(default.shape)}, got {tuple(w.shape)}")
                self.register_parameter(name, nn.Parameter(w))
        self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps) if qk_norm else None
        # the paper's GroupNorm, and its variations: a gain per head after it, its strength blended in from 0
        self.head_norm = RMSNorm(head_dim, eps=head_norm_eps, weight=head_norm_weight) if head_norm else None
        if (head_gain or head_norm_blend or not head_norm_weight or head_norm_init != 1.0) and not head_norm:
            raise ValueError("head_gain, head_norm_blend, head_norm_weight=False and head_norm_init vary GroupNorm: "
                             "they need head_norm=True")
        if head_norm_init != 1.0 and not head_norm_weight:
            raise ValueError("head_norm_init is the initial value of the norm's per-feature weight: it needs "
                             "head_norm_weight=True")
        self.head_norm_init = head_norm_init
        if self.head_norm is not None and self.head_norm.weight is not None:
            nn.init.constant_(self.head_norm.weight, head_norm_init)
        self.head_gain = nn.Parameter(torch.ones(num_heads)) if head_gain else None
        self.head_norm_blend = nn.Parameter(torch.zeros(num_heads)) if head_norm_blend else None
        self.attention_map = AttentionMap()  # eager attention hands its probabilities through here
        self.cache_layout: CacheLayout = self._layout(kv_quant)

    def _layout(self, kv_quant: KVQuant | None) -> CacheLayout:
        return cache_layout(num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, key_components=self.num_key_components,
                            value_components=self.num_value_components, value_latent_dim=self.value_latent_dim,
                            hlc=self.hlc, qk_norm=self.k_norm is not None, kv_quant=kv_quant)

    def set_kv_quant(self, kv_quant: KVQuant | None) -> None:
        """Store this layer's keys and values quantized (None: in the model's dtype) from the next cache on."""
        self.cache_layout = self._layout(kv_quant)
        self.spec["kv_quant"] = kv_quant

    @property
    def _value_split(self) -> tuple[int, int]:
        """How v_proj's output splits per token: (h'_V, D) components or (1, R) a latent."""
        return (1, self.value_latent_dim) if self.value_latent_dim else (self.num_value_components, self.head_dim)

    def initial_mixing(self, how: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The configured initial (W^K, W^V) of this layer's mixing kinds and sizes."""
        h, d = self.num_kv_heads, self.head_dim
        return (init_mixing(self.key_mixing, self.num_key_components, h, d, how),
                init_mixing(self.value_mixing, self.value_latent_dim or self.num_value_components, h, d,
                            how if self.value_mixing == "head" else None))

    def composite_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the h composite heads, (B, T, h, D) each, before QK-norm and RoPE. The mixing is
        folded into the projection weights (independent of batch), so training pays one matmul per K and V,
        like the baseline; gradients reach W_lc and k/v_proj alike."""
        b, t, _ = x.shape
        if self.hlc:
            k = F.linear(x, *fold_mixing(self.k_proj.weight, self.k_proj.bias, self.hlc_k, self.key_mixing,
                                         self.head_dim))
            v = F.linear(x, *fold_mixing(self.v_proj.weight, self.v_proj.bias, self.hlc_v, self.value_mixing,
                                         self.head_dim))
        else:
            k, v = self.k_proj(x), self.v_proj(x)
        return k.view(b, t, self.num_kv_heads, self.head_dim), v.view(b, t, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache: MEACache | None = None,
        eager: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C); cos/sin (B, T, 1, D); mask bool (B, 1, T, past+T) or None (causal, no padding).
        eager: compute the attention probabilities explicitly and pass them through `attention_map`."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # (B, T, N, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin)
        if cache is None:
            out = self._attend_uncached(x, q, cos, sin, mask, eager)
        else:
            out = self._attend_cached(x, q, cos, sin, mask, cache, eager)
        return self.o_proj(self.combine_heads(out).reshape(b, t, self.num_heads * self.head_dim))

    def combine_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head attention outputs (B, T, heads, width) before o_proj."""
        if self.head_norm is None:
            return out
        normed = self.head_norm(out)  # GroupNorm: RMSNorm of each head's output on its own
        if self.head_norm_blend is not None:  # (B, T, heads, width) with one a per head
            a = self.head_norm_blend.to(out.dtype)[:, None]
            normed = out + a * (normed - out)
        if self.head_gain is not None:
            normed = normed * self.head_gain.to(out.dtype)[:, None]
        return normed

    def _attend_uncached(self, x, q, cos, sin, mask, eager):
        k, v = self.composite_kv(x)  # (B, T, h, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return self._attend(q, apply_rope(k, cos, sin), v, mask, eager=eager)

    def _attend_cached(self, x, q, cos, sin, mask, cache: MEACache, eager):
        b, t, _ = x.shape
        layout = self.cache_layout
        k = self.k_proj(x).view(b, t, self.num_key_components, self.head_dim)  # (B, T, h'_K, D)
        v = self.v_proj(x).view(b, t, *self._value_split)  # (B, T, h'_V, D) or (B, T, 1, R)
        past = cache.get_seq_length(self.layer_idx)
        if not layout.absorbed:  # cache the h composite heads, head-major (one block per KV head)
            if self.hlc:
                k, v = mix(k, self.hlc_k, self.key_mixing), mix(v, self.hlc_v, self.value_mixing)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = apply_rope(k, cos, sin)
            k_cached, v_cached = cache.update(k, v, self.layer_idx, heads_first=layout.heads_first, quant=layout.quant)
            if past == 0:
                return self._attend(q, k, v, mask, eager=eager)
            if eager:
                k_cached, v_cached = _float(k_cached, v_cached, layout)
            return self._attend(q, k_cached, v_cached, mask, decode=True, eager=eager)
        k_scale = None  # (B, T, h): 1/RMS of each composite key, when QK-norm follows mixing
        if self.k_norm is not None:  # "head" mixing only (checked): the norm's feature scale commutes with it
            k_scale = inverse_rms(mix(k, self.hlc_k, self.key_mixing), self.k_norm.eps)
            k = k * self.k_norm.weight
        k = apply_rope(k, cos, sin)
        k_cached, v_cached = cache.update(k, v, self.layer_idx, k_scale=k_scale, heads_first=layout.heads_first,
                                          quant=layout.quant)
        if past == 0:  # prefill: expand to h heads over the new tokens only
            k_h, v_h = mix(k, self.hlc_k, self.key_mixing), mix(v, self.hlc_v, self.value_mixing)
            if k_scale is not None:
                k_h = k_h * k_scale[..., None].to(k_h.dtype)
            return self._attend(q, k_h, v_h, mask, eager=eager)
        k_scale_cached = cache.layers[self.layer_idx].cached_k_scale()
        if eager:  # the probabilities need the h composite heads over the whole cache
            k_cached, v_cached = _float(k_cached, v_cached, layout)
            k_h, v_h = mix(k_cached, self.hlc_k, self.key_mixing), mix(v_cached, self.hlc_v, self.value_mixing)
            if k_scale_cached is not None:
                k_h = k_h * k_scale_cached[..., None].to(k_h.dtype)
            return self._attend(q, k_h, v_h, mask, eager=True)
        # decoding from the compressed cache, read once
        return absorbed_attention(q, k_cached, v_cached, self.hlc_k, self.hlc_v, mask=mask, scale=self.scale,
                                  k_scale_BSH=k_scale_cached, key_mixing=self.key_mixing,
                                  value_mixing=self.value_mixing)

    def _attend(self, q, k, v, mask, *, decode: bool = False, eager: bool = False):
        """Attention over h KV heads; under eager, its probabilities pass through `attention_map`."""
        out, weights = self._attention(q, k, v, mask, decode=decode, eager=eager)
        if weights is not None:
            self.attention_map(weights)
        return out

    def _attention(self, q, k, v, mask, *, decode: bool, eager: bool):
        """Plain (no HLC) attention -> (outputs (B, T, N, D), probabilities (B, N, T, S) under eager, else None);
        the hook where variants change the attention map."""
        if eager:
            return eager_attention(q, k, v, mask=mask, scale=self.scale)
        if decode:
            return grouped_attention(q, k, v, mask=mask, scale=self.scale), None
        return expanded_attention(q, k, v, mask=mask, scale=self.scale), None

    def extra_repr(self) -> str:
        values = (f"value_latent={self.value_latent_dim}" if self.value_latent_dim
                  else f"value_components={self.num_value_components}")
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, key_components={self.num_key_components} "
                f"({self.key_mixing}), {values}, head_dim={self.head_dim}, hlc={self.hlc}, "
                f"head_norm={self.head_norm is not None}, decode={self.cache_layout.kernel}")
