"""From an MEA checkpoint's attention tensors to what the serving layers hold (pure torch, no engine).

Plain layers (h' = h) get HLC folded into k_proj / v_proj (`ops.fold_mixing`), so the engine sees ordinary
GQA weights. Compressed layers keep k_proj / v_proj as they are (the components) and hold their mixing
weights repeated per query head, for the query heads one tensor-parallel rank computes.
"""

from __future__ import annotations

import torch

from ..ops import fold_mixing


def per_query_head(w: torch.Tensor, *, num_heads: int, start: int, stop: int) -> torch.Tensor:
    """Mixing weights (M, h, ...) -> (M, stop - start, ...): the KV-head column G(i) = i // (N / h) of each
    query head i in [start, stop). With one column per query head, `absorb_query` / `read_values` run with
    num_kv_heads = stop - start (group size 1) on a rank's slice of the heads."""
    h = w.shape[1]
    if num_heads % h:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of the mixing's KV heads ({h})")
    return w.repeat_interleave(num_heads // h, dim=1)[:, start:stop]


def folded_projection(weight: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor | None, kind: str,
                      head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A plain layer's composite-head projection: HLC folded in (no HLC: unchanged)."""
    if w is None:
        return weight, bias
    return fold_mixing(weight, bias, w.to(weight.dtype), kind, head_dim)
