"""`MEAAttention`: grouped-query attention with Head-level Linear Composition (HLC) and GroupNorm.

One class gives the four variants the paper compares:
    hlc=False, head_norm=False   baseline GQA
    hlc=False, head_norm=True    + GroupNorm
    hlc=True,  head_norm=False   MEA without GroupNorm
    hlc=True,  head_norm=True    MEA

k_proj / v_proj produce h' component heads; HLC matrices W_lc^K, W_lc^V (h' x h) recombine them into
h composite heads. Component heads are cached after RoPE (RoPE commutes with head mixing).

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

from ..cache import MEACache
from ..ops import (
    absorbed_attention,
    apply_rope,
    expanded_attention,
    fold_into_projection,
    grouped_attention,
    init_hlc,
    inverse_rms,
    mix_heads,
)
from .norm import RMSNorm

class MEAAttention(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        num_component_heads: int | None = None,
        hlc: bool = True,
        head_norm: bool = True,
        head_norm_eps: float = 1e-5,
        hlc_init: str | None = None,
        hlc_k: torch.Tensor | None = None,
        hlc_v: torch.Tensor | None = None,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        out_bias: bool = False,
        layer_idx: int = 0,
    ):
        super().__init__()
        # the shape and switches, to build a sibling layer (e.g. with fewer component heads)
        self.spec = dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         num_component_heads=num_component_heads, hlc=hlc, head_norm=head_norm,
                         head_norm_eps=head_norm_eps, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, qkv_bias=qkv_bias,
                         out_bias=out_bias, layer_idx=layer_idx)
        head_dim = head_dim or hidden_size // num_heads
        num_component_heads = num_kv_heads if num_component_heads is None else num_component_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 1 <= num_component_heads <= num_kv_heads:
            raise ValueError(f"num_component_heads h' must be in [1, h={num_kv_heads}], got {num_component_heads}")
        if not hlc and num_component_heads != num_kv_heads:
            raise ValueError("num_component_heads < num_kv_heads needs hlc=True (HLC rebuilds the h heads)")
        self.num_heads, self.num_kv_heads, self.num_component_heads = num_heads, num_kv_heads, num_component_heads
        self.head_dim, self.scale, self.layer_idx = head_dim, head_dim**-0.5, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_component_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_component_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        self.hlc = hlc
        if hlc:
            default = init_hlc(num_component_heads, num_kv_heads, hlc_init)
            for name, given in (("hlc_k", hlc_k), ("hlc_v", hlc_v)):
                w = default.clone() if given is None else torch.as_tensor(given, dtype=torch.float32).clone()
                if w.shape != (num_component_heads, num_kv_heads):
                    raise ValueError(f"{name} must have shape (h', h) = {(num_component_heads, num_kv_heads)}, got {tuple(w.shape)}")
                self.register_parameter(name, nn.Parameter(w))
        self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps) if qk_norm else None
        self.head_norm = RMSNorm(head_dim, eps=head_norm_eps) if head_norm else None  # the paper's GroupNorm

    def composite_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the h composite heads, (B, T, h, D) each, before QK-norm and RoPE. HLC is
        folded into the projection weights (an h x h' x D x C einsum, independent of batch), so training
        pays one matmul per K and V, like the baseline; gradients reach W_lc and k/v_proj alike."""
        b, t, _ = x.shape
        if self.hlc:
            k = F.linear(x, *fold_into_projection(self.k_proj.weight, self.k_proj.bias, self.hlc_k, self.head_dim))
            v = F.linear(x, *fold_into_projection(self.v_proj.weight, self.v_proj.bias, self.hlc_v, self.head_dim))
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
    ) -> torch.Tensor:
        """x (B, T, C); cos/sin (B, T, 1, D); mask bool (B, 1, T, past+T) or None (causal, no padding)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # (B, T, N, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin)
        if cache is None:
            out = self._attend_uncached(x, q, cos, sin, mask)
        else:
            out = self._attend_cached(x, q, cos, sin, mask, cache)
        return self.o_proj(self.combine_heads(out).reshape(b, t, self.num_heads * self.head_dim))

    def combine_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head attention outputs (B, T, heads, width) before o_proj."""
        if self.head_norm is not None:
            out = self.head_norm(out)  # GroupNorm: RMSNorm of each head's output on its own
        return out

    def _attend_uncached(self, x, q, cos, sin, mask):
        k, v = self.composite_kv(x)  # (B, T, h, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return self._attend(q, apply_rope(k, cos, sin), v, mask)

    @property
    def caches_components(self) -> bool:
        """Whether the cache holds the h' < h component heads (read by the absorbed decode). With h' = h (or
        no HLC) it holds the h composite heads instead: the same bytes, read by plain GQA."""
        return self.hlc and self.num_component_heads < self.num_kv_heads

    def _attend_cached(self, x, q, cos, sin, mask, cache: MEACache):
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_component_heads, self.head_dim)  # (B, T, h', D)
        v = self.v_proj(x).view(b, t, self.num_component_heads, self.head_dim)  # (B, T, h', D)
        past = cache.get_seq_length(self.layer_idx)
        if not self.caches_components:  # cache the h composite heads, head-major (one block per KV head)
            if self.hlc:
                k, v = mix_heads(k, self.hlc_k), mix_heads(v, self.hlc_v)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = apply_rope(k, cos, sin)
            k_cached, v_cached = cache.update(k, v, self.layer_idx, heads_first=True)
            return self._attend(q, k, v, mask) if past == 0 else self._attend(q, k_cached, v_cached, mask, decode=True)
        k_scale = None  # (B, T, h): 1/RMS of each composite key, when QK-norm follows mixing
        if self.k_norm is not None:
            k_scale = inverse_rms(mix_heads(k, self.hlc_k), self.k_norm.eps)
            k = k * self.k_norm.weight
        k = apply_rope(k, cos, sin)
        k_cached, v_cached = cache.update(k, v, self.layer_idx, k_scale=k_scale)  # token-major
        if past == 0:  # prefill: expand to h heads over the new tokens only
            k_h, v_h = mix_heads(k, self.hlc_k), mix_heads(v, self.hlc_v)
            if k_scale is not None:
                k_h = k_h * k_scale[..., None].to(k_h.dtype)
            return self._attend(q, k_h, v_h, mask)
        # decoding from the compressed cache, read once
        return absorbed_attention(q, k_cached, v_cached, self.hlc_k, self.hlc_v, mask=mask, scale=self.scale,
                                  k_scale_BSH=cache.layers[self.layer_idx].cached_k_scale())

    def _attend(self, q, k, v, mask, *, decode: bool = False):
        """Plain (no HLC) attention over h KV heads; the hook where variants change the attention map."""
        if decode:
            return grouped_attention(q, k, v, mask=mask, scale=self.scale)
        return expanded_attention(q, k, v, mask=mask, scale=self.scale)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, component_heads={self.num_component_heads}, "
                f"head_dim={self.head_dim}, hlc={self.hlc}, head_norm={self.head_norm is not None}")
