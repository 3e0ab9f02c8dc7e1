"""The KV cache of MEA: each layer holds only its h' component heads (after RoPE), never h heads.

It plugs into Hugging Face's Cache API, so `generate` (greedy, sampling, beam search) drives it.
Layout per layer: keys and values (B, capacity, h', D), so that the h' heads of one token are
contiguous and the absorbed decode reads them as one (h'*D)-wide multi-query head. Storage is
preallocated (to the generation length when `generate` tells it) and grows in blocks, so appending a
token writes one slot instead of re-copying the whole cache.

With QK-norm applied after mixing, the layer also keeps one float per token and composite head
(`k_scale`, the inverse RMS of the mixed key): h floats per token against h'*D for the keys.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROWTH_BLOCK = 256  # tokens added per reallocation when no capacity was reserved


class MEACacheLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity_hint = capacity
        self.length = 0
        self.k_scale: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _reserve(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor, like_scale: torch.Tensor | None):
        capacity = 0 if self.keys is None else self.keys.shape[1]
        if needed <= capacity:
            return
        if needed <= self.capacity_hint:
            new_capacity = self.capacity_hint
        else:
            new_capacity = -(-needed // GROWTH_BLOCK) * GROWTH_BLOCK
        b = like_k.shape[0]

        def grow(old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            new = like.new_empty((b, new_capacity, *like.shape[2:]))
            if old is not None and self.length:
                new[:, : self.length] = old[:, : self.length]
            return new

        self.keys, self.values = grow(self.keys, like_k), grow(self.values, like_v)
        if like_scale is not None:
            self.k_scale = grow(self.k_scale, like_scale)

    def update(self, key_states, value_states, *args, k_scale: torch.Tensor | None = None, **kwargs):
        """Append (B, T, h', D) component keys/values (and (B, T, h) k_scale); return the cached views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[1]
        self._reserve(self.length + t, key_states, value_states, k_scale)
        end = self.length + t
        self.keys[:, self.length : end] = key_states
        self.values[:, self.length : end] = value_states
        if k_scale is not None:
            self.k_scale[:, self.length : end] = k_scale
        self.length = end
        return self.keys[:, :end], self.values[:, :end]

    def cached_k_scale(self) -> torch.Tensor | None:
        return None if self.k_scale is None else self.k_scale[:, : self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def _buffers(self) -> list[str]:
        return ["keys", "values"] + (["k_scale"] if self.k_scale is not None else [])

    def _apply_batch(self, fn) -> None:
        for name in self._buffers():
            setattr(self, name, fn(getattr(self, name)))

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self._apply_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._apply_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._apply_batch(lambda x: x[indices])

    def _bytes(self, tokens: int | None) -> int:
        if self.keys is None:
            return 0
        return sum(getattr(self, n)[:, :tokens].numel() * getattr(self, n).element_size() for n in self._buffers())

    def bytes_held(self) -> int:
        """Bytes of the tensors this layer holds (its whole allocation)."""
        return self._bytes(None)

    def bytes_used(self) -> int:
        """Bytes of the `length` tokens actually stored."""
        return self._bytes(self.length)


class MEACache(Cache):
    """One `MEACacheLayer` per decoder layer. `capacity`: tokens to preallocate per layer (0: grow)."""

    def __init__(self, num_layers: int, capacity: int = 0):
        super().__init__(layers=[MEACacheLayer(capacity) for _ in range(num_layers)])

    def bytes_held(self) -> int:
        return sum(layer.bytes_held() for layer in self.layers)

    def bytes_used(self) -> int:
        return sum(layer.bytes_used() for layer in self.layers)
