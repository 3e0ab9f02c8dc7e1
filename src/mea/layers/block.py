"""The Llama-style decoder block around `MEAAttention`: pre-RMSNorm, attention, pre-RMSNorm, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..cache import MEACache
from .attention import MEAAttention
from .norm import RMSNorm


class SwiGLU(nn.Module):
    def __init__(self, *, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MEADecoderLayer(GradientCheckpointingLayer):
    """With `model.gradient_checkpointing_enable()`, training recomputes each block in the backward pass
    (transformers' `GradientCheckpointingLayer`: x, cos, sin positional, the cache dropped while training)."""

    def __init__(self, *, attention: MEAAttention, hidden_size: int, intermediate_size: int,
                 rms_norm_eps: float = 1e-6, mlp_bias: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.mlp = SwiGLU(hidden_size=hidden_size, intermediate_size=intermediate_size, bias=mlp_bias)

    def forward(self, x, cos, sin, *, mask: torch.Tensor | None = None, cache: MEACache | None = None,
                eager: bool = False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache, eager=eager)
        return x + self.mlp(self.post_attention_layernorm(x))
