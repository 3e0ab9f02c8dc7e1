from __future__ import annotations

import torch
from torch import nn

from ..ops import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm with a learnable per-feature scale (Llama's, and per head the paper's GroupNorm); with
    `weight=False` plain RMS normalisation, no parameters."""

    def __init__(self, dim: int, *, eps: float = 1e-6, weight: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + ("" if self.weight is not None else ", weight=False")
