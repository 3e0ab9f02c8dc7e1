"""Head-level Linear Composition (HLC): recombine h' component heads into h composite heads.

    K_lc[b, t, j, :] = sum_m K_comp[b, t, m, :] * W_lc[m, j]        W_lc: (h', h)

Keys and values use separate matrices (W_lc^K, W_lc^V). Queries are never mixed.
"""

from __future__ import annotations

import torch

HLC_INITS = ("identity", "shared")


def init_hlc(num_components: int, num_heads: int, how: str | None = None) -> torch.Tensor:
    """(h', h) initial HLC matrix. identity: h' = h, no mixing. shared: composite head j starts as
    component head j mod h' (a grouping of composite heads onto fewer components). None: identity
    when h' = h, else shared."""
    how = how or ("identity" if num_components == num_heads else "shared")
    if how not in HLC_INITS:
        raise ValueError(f"unknown HLC init {how!r}; choose one of {', '.join(HLC_INITS)} or pass matrices")
    if how == "identity" and num_components != num_heads:
        raise ValueError(f"HLC init 'identity' needs h' = h (got h'={num_components}, h={num_heads}); use 'shared'")
    w = torch.zeros(num_components, num_heads)
    w[torch.arange(num_heads) % num_components, torch.arange(num_heads)] = 1.0
    return w


def mix_heads(x_BTMD: torch.Tensor, w_MH: torch.Tensor) -> torch.Tensor:
    """(B, T, h', d) x (h', h) -> (B, T, h, d), contiguous (fused attention kernels need a unit last stride)."""
    return w_MH.T.to(x_BTMD.dtype) @ x_BTMD  # (h, h') @ (B, T, h', d), batched over (B, T)


def fold_into_projection(weight: torch.Tensor, bias: torch.Tensor | None, w_MH: torch.Tensor, head_dim: int):
    """HLC folded into a (h' D, C) projection: head j of the result is sum_m W[m, j] (W_m x + b_m).
    Returns the (h D, C) weight and (h D,) bias of the same linear map."""
    m, h = w_MH.shape
    w_MH = w_MH.to(weight.dtype)
    folded = torch.einsum("mdc,mj->jdc", weight.view(m, head_dim, -1), w_MH).reshape(h * head_dim, -1)
    if bias is None:
        return folded, None
    return folded, torch.einsum("md,mj->jd", bias.view(m, head_dim), w_MH).reshape(h * head_dim)


def mix_heads_reference(x_BTMD: torch.Tensor, w_MH: torch.Tensor) -> torch.Tensor:
    """Readable reference: composite head j is the weighted sum of the component heads."""
    num_components, num_heads = w_MH.shape
    heads = [sum(x_BTMD[:, :, m] * w_MH[m, j] for m in range(num_components)) for j in range(num_heads)]
    return torch.stack(heads, dim=2)
