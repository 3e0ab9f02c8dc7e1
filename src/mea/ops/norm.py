"""RMSNorm over the last dimension; applied per head it is the paper's "GroupNorm".

Computed in float32 and cast back, like Llama's RMSNorm, so converted checkpoints match exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; x of any shape (..., d). One fused kernel
    that accumulates in float32 for half-precision inputs (Llama casts before the weight multiply;
    the difference is one rounding in bf16, none in float32)."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype) if weight is not None else None, eps=eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, in float32: (..., d) -> (...)."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)
