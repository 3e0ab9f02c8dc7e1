"""Differential attention (Ye et al. 2024, "Differential Transformer"), the paper's DFA baseline, as a
variant of `MEAAttention` with the same projections and cache.

With N query heads and h KV heads of size D, the layer has N/2 differential heads. Head j splits its
query into two halves [q1; q2] (query heads 2j, 2j+1), its KV group g splits the keys into [k1; k2]
(KV heads 2g, 2g+1) and reads one value of width 2D (KV heads 2g and 2g+1 concatenated):

    DiffAttn_j = softmax(q1 k1^T / sqrt(D)) v  -  lambda * softmax(q2 k2^T / sqrt(D)) v
    lambda     = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init
    lambda_init = 0.8 - 0.6 exp(-0.3 l)          (l = 0-based layer index)

Each head's output goes through RMSNorm over its 2D features (the paper's GroupNorm / subln) and is
scaled by (1 - lambda_init). Parameter count and projection sizes equal the baseline's, plus 4D
scalars per layer. Both softmax maps run through the same fused kernels as the baseline.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import MEAAttention
from .norm import RMSNorm


def lambda_init_for(layer_idx: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DifferentialAttention(MEAAttention):
    def __init__(self, **kwargs):
        if kwargs.get("hlc", True) or kwargs.get("qk_norm", False):
            raise ValueError("differential attention is a baseline without HLC or QK-norm: set hlc=False, qk_norm=False")
        super().__init__(**kwargs)
        if self.num_heads % 2 or self.num_kv_heads % 2:
            raise ValueError(f"differential attention pairs heads: num_heads ({self.num_heads}) and num_kv_heads "
                             f"({self.num_kv_heads}) must both be even")
        d = self.head_dim
        self.lambda_init = lambda_init_for(self.layer_idx)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.zeros(d)) for _ in range(4))
        self.reset_lambdas()
        if self.head_norm is not None:
            self.head_norm = RMSNorm(2 * d, eps=self.head_norm.eps)

    def reset_lambdas(self, std: float = 0.1) -> None:
        """The Differential Transformer's init: lambda vectors ~ N(0, 0.1)."""
        with torch.no_grad():
            for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
                p.normal_(0.0, std)

    def lambda_full(self) -> torch.Tensor:
        wide = torch.promote_types(self.lambda_q1.dtype, torch.float32)  # at least fp32 under low precision
        q1, k1, q2, k2 = (p.to(wide) for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2))
        return torch.exp(torch.dot(q1, k1)) - torch.exp(torch.dot(q2, k2)) + self.lambda_init

    def _attention(self, q, k, v, mask, *, decode: bool, eager: bool):
        """The differential map softmax_1 - lambda softmax_2: outputs and, under eager, the map (B, N/2, T, S)."""
        b, t, n, d = q.shape
        s, h = k.shape[1], k.shape[2]
        q = q.view(b, t, n // 2, 2, d)  # (B, T, N/2, 2, D): the two query halves of each differential head
        k = k.view(b, s, h // 2, 2, d)  # (B, S, h/2, 2, D)
        v = v.reshape(b, s, h // 2, 2 * d)  # (B, S, h/2, 2D): one wide value per KV group
        a1, w1 = super()._attention(q[:, :, :, 0], k[:, :, :, 0], v, mask, decode=decode, eager=eager)
        a2, w2 = super()._attention(q[:, :, :, 1], k[:, :, :, 1], v, mask, decode=decode, eager=eager)
        lam = self.lambda_full()
        return a1 - lam.to(a1.dtype) * a2, None if w1 is None else w1 - lam.to(w1.dtype) * w2

    def combine_heads(self, out: torch.Tensor) -> torch.Tensor:
        return super().combine_heads(out) * (1.0 - self.lambda_init)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", differential=True, lambda_init={self.lambda_init:.3f}"
