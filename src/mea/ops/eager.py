"""Eager attention: the attention probabilities computed explicitly, so that they can be returned
(`output_attentions=True`, `attn_implementation="eager"`). Slower and larger than the fused kernels of
`ops.attention`, which compute the same outputs; use it to inspect attention, not to serve.

Shapes as in `ops.attention`: B batch, T query length, S key length, N query heads, H KV heads, D head size.
"""

from __future__ import annotations

import torch


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool (1, 1, T, S): query t (at absolute position S - T + t) sees keys 0 .. S - T + t."""
    key_pos = torch.arange(k_len, device=device)
    query_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return (key_pos <= query_pos)[None, None]


def eager_attention(
    q_BTND: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHE: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA softmax attention with its probabilities: returns (B, T, N, E) outputs and (B, N, T, S) weights,
    float32 softmax as in transformers' eager attention. mask: bool (B, 1, T, S), or None for causal."""
    t, n = q_BTND.shape[1], q_BTND.shape[2]
    s, h = k_BSHD.shape[1], k_BSHD.shape[2]
    k = k_BSHD.repeat_interleave(n // h, dim=2)  # (B, S, N, D)
    v = v_BSHE.repeat_interleave(n // h, dim=2)  # (B, S, N, E)
    scores = torch.einsum("btnd,bsnd->bnts", q_BTND, k) * scale  # (B, N, T, S)
    allowed = causal_mask(t, s, scores.device) if mask is None else mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_BTND.dtype)
    return torch.einsum("bnts,bsne->btne", weights, v), weights
