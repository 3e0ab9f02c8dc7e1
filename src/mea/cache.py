"""The KV cache of MEA: each layer holds only its h' component heads (after RoPE), never h heads.

It plugs into Hugging Face's Cache API, so `generate` (greedy, sampling, beam search) drives it.
Layout per layer (`CacheLayout`, decided by `cache_layout` and passed by the attention layer on its first
update): token-major (B, capacity, h', D) for compressed layers, so that the components of one token are
contiguous and the absorbed decode reads them as one (h'*D)-wide multi-query head (keys and values may
have different widths: separate component counts, or a value latent stored as (B, capacity, 1, R));
head-major (B, h, capacity, D) for layers that cache their h composite heads (no HLC, or nothing
compressed), so that each KV head is one contiguous block for the plain GQA kernel. Storage is
preallocated (to the generation length when `generate` tells it) and grows in blocks, so appending a
token writes one slot instead of re-copying the whole cache.

With QK-norm applied after mixing, the layer also keeps one float per token and composite head
(`k_scale`, the inverse RMS of the mixed key): h floats per token against h'*D for the keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROWTH_BLOCK = 256  # tokens added per reallocation when no capacity was reserved


@dataclass(frozen=True)
class CacheLayout:
    """What one layer caches per token and which kernel decodes from it. Decided in one place
    (`cache_layout`) and read by the attention layer, the configuration's byte prediction and the
    benchmarks.

    absorbed: token-major (B, S, heads, features) components, read once per step by `absorbed_attention`;
    otherwise head-major (B, h, S, D) composite heads, read by plain GQA (`grouped_attention`)."""

    absorbed: bool
    key_shape: tuple[int, int]  # (heads, features) of one token's keys
    value_shape: tuple[int, int]  # (heads, features) of one token's values; (1, R) for a value latent
    k_scale_heads: int = 0  # float32 logit factors per token (QK-norm after mixing, absorbed layers)

    @property
    def kernel(self) -> str:
        return "absorbed" if self.absorbed else "grouped"

    @property
    def heads_first(self) -> bool:
        return not self.absorbed

    def bytes_per_token(self, bytes_per_element: int = 2) -> int:
        elements = math.prod(self.key_shape) + math.prod(self.value_shape)
        return elements * bytes_per_element + 4 * self.k_scale_heads


def cache_layout(*, num_kv_heads: int, head_dim: int, key_components: int, value_components: int | None = None,
                 value_latent_dim: int | None = None, hlc: bool = True, qk_norm: bool = False) -> CacheLayout:
    """The layout of a layer with M_K key components and either M_V value components or a value latent of
    width R. A layer caches its components (absorbed decode) when that holds fewer bytes than the h
    composite heads; otherwise (no HLC, or nothing compressed) it caches the h composite heads."""
    h, d = num_kv_heads, head_dim
    if (value_components is None) == (value_latent_dim is None):
        raise ValueError("give a layer's value cache as exactly one of value_components or value_latent_dim")
    value_shape = (1, value_latent_dim) if value_latent_dim is not None else (value_components, d)
    if not hlc or (key_components >= h and math.prod(value_shape) >= h * d):
        return CacheLayout(absorbed=False, key_shape=(h, d), value_shape=(h, d))
    return CacheLayout(absorbed=True, key_shape=(key_components, d), value_shape=value_shape,
                       k_scale_heads=h if qk_norm else 0)


class MEACacheLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity_hint = capacity
        self.length = 0
        self.k_scale: torch.Tensor | None = None
        self.heads_first = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _tokens(self, x: torch.Tensor, start: int, end: int | None) -> torch.Tensor:
        """Tokens [start, end) of a stored tensor: keys/values (4-D) in the layer's layout, k_scale (3-D)
        always token-major."""
        if self.heads_first and x.dim() == 4:
            return x[:, :, start:end]
        return x[:, start:end]

    def _reserve(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor, like_scale: torch.Tensor | None):
        capacity = 0 if self.keys is None else self.keys.shape[2 if self.heads_first else 1]
        if needed <= capacity:
            return
        if needed <= self.capacity_hint:
            new_capacity = self.capacity_hint
        else:
            new_capacity = -(-needed // GROWTH_BLOCK) * GROWTH_BLOCK
        b = like_k.shape[0]

        def grow(old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:  # like: (B, T, heads, D) or (B, T, h)
            if self.heads_first and like.dim() == 4:
                new = like.new_empty((b, like.shape[2], new_capacity, like.shape[3]))
            else:
                new = like.new_empty((b, new_capacity, *like.shape[2:]))
            if old is not None and self.length:
                self._tokens(new, 0, self.length).copy_(self._tokens(old, 0, self.length))
            return new

        self.keys, self.values = grow(self.keys, like_k), grow(self.values, like_v)
        if like_scale is not None:
            self.k_scale = grow(self.k_scale, like_scale)

    def update(self, key_states, value_states, *args, k_scale: torch.Tensor | None = None, heads_first: bool = False,
               **kwargs):
        """Append (B, T, h', D) component keys/values (and (B, T, h) k_scale); return the cached keys and
        values as (B, S, h', D) views of the storage (`heads_first`, fixed by the first update: store
        head-major)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.heads_first = heads_first
        t = key_states.shape[1]
        self._reserve(self.length + t, key_states, value_states, k_scale)
        end = self.length + t
        for store, new in ((self.keys, key_states), (self.values, value_states), (self.k_scale, k_scale)):
            if new is not None:
                self._tokens(store, self.length, end).copy_(new.transpose(1, 2) if self.heads_first and new.dim() == 4
                                                            else new)
        self.length = end
        k, v = self._tokens(self.keys, 0, end), self._tokens(self.values, 0, end)
        return (k.transpose(1, 2), v.transpose(1, 2)) if self.heads_first else (k, v)

    @property
    def num_heads(self) -> int:
        """h': the number of (component) heads stored per token."""
        return self.keys.shape[1 if self.heads_first else 2]

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

    def _stored(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._buffers()]

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
        return sum(self._tokens(x, 0, tokens).numel() * x.element_size() for x in self._stored())

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


def cache_bytes_held(cache: Cache) -> int:
    """Bytes of the tensors a Hugging Face cache holds: its whole allocation, spare capacity included."""
    return cache.bytes_held() if isinstance(cache, MEACache) else _layer_tensor_bytes(cache)


def cache_bytes_used(cache: Cache) -> int:
    """Bytes of the tokens a Hugging Face cache has stored (an MEACache may hold spare capacity beyond them)."""
    return cache.bytes_used() if isinstance(cache, MEACache) else _layer_tensor_bytes(cache)


def _layer_tensor_bytes(cache: Cache) -> int:
    """Every tensor the layers of a cache that holds exactly its tokens keep: keys/values (DynamicCache); for a
    QuantizedCache the packed codes, scales and zero points and the full-precision residual; for a pruned
    kvpress cache the kept tokens."""
    seen: set[int] = set()
    return sum(_tensor_bytes(v, seen) for layer in getattr(cache, "layers", []) for v in vars(layer).values())


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensors in `obj` (tensors, tensor subclasses such as quanto's QTensor, and lists, tuples
    and dicts of them); a storage counted once."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):  # e.g. quanto's packed codes
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), seen) for n in names)
        if obj.numel() == 0:
            return 0
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    return 0
