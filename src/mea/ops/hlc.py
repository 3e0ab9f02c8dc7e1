"""Head-level Linear Composition (HLC): recombine h' component heads into h composite heads.

    K_lc[b, t, j, :] = sum_m K_comp[b, t, m, :] * W_lc[m, j]        W_lc: (h', h)

Keys and values use separate matrices (W_lc^K, W_lc^V). Queries are never mixed.
"""

from __future__ import annotations

import torch


def mix_heads(x_BTMD: torch.Tensor, w_MH: torch.Tensor) -> torch.Tensor:
    """(B, T, h', d) x (h', h) -> (B, T, h, d), one batched matmul over the head axis."""
    # (B, T, d, h') @ (h', h) -> (B, T, d, h) -> (B, T, h, d)
    return (x_BTMD.transpose(-1, -2) @ w_MH.to(x_BTMD.dtype)).transpose(-1, -2)


def mix_heads_reference(x_BTMD: torch.Tensor, w_MH: torch.Tensor) -> torch.Tensor:
    """Readable reference: composite head j is the weighted sum of the component heads."""
    num_components, num_heads = w_MH.shape
    heads = [sum(x_BTMD[:, :, m] * w_MH[m, j] for m in range(num_components)) for j in range(num_heads)]
    return torch.stack(heads, dim=2)
