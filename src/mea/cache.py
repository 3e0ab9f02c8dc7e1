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

Quantized storage (`KVQuant`, from the model config's `mea_kv_*` fields or given to `MEACache`): the same
two layouts, seen as (B, G, S, E) storage heads (G = 1 wide head of all components for absorbed layers,
G = h for head-major ones), hold keys per channel and values per token as int8 / packed int4 codes with
float16 scales and zero points (`ops.kvquant`). Tokens enter a full-precision tail; whenever the tail holds
more than `residual` tokens plus a whole group, the oldest whole groups are quantized into the codes.
Decoding reads the codes in place, never a full-precision copy (`ops.attention.decode_blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops.kvquant import KVQuant, QuantizedTokens, quantize_keys, quantize_values, value_plane_width

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
    quant: KVQuant | None = None  # integer storage of keys and values; None: the model's float dtype

    @property
    def kernel(self) -> str:
        return "absorbed" if self.absorbed else "grouped"

    @property
    def heads_first(self) -> bool:
        return not self.absorbed

    @property
    def storage_heads(self) -> int:
        """G of the (B, G, S, E) storage: one wide head for absorbed layers, h heads otherwise."""
        return 1 if self.absorbed else self.key_shape[0]

    @property
    def key_features(self) -> int:
        return math.prod(self.key_shape) // self.storage_heads

    @property
    def value_features(self) -> int:
        return math.prod(self.value_shape) // self.storage_heads

    def bytes_per_token(self, bytes_per_element: int = 2) -> float:
        """Bytes per token of a long cache: the quantized rate (codes and scales) when quantized."""
        if self.quant is not None:
            per_head = self.quant.bytes_per_token(self.key_features, self.value_features)
            return self.storage_heads * per_head + 4 * self.k_scale_heads
        elements = math.prod(self.key_shape) + math.prod(self.value_shape)
        return elements * bytes_per_element + 4 * self.k_scale_heads

    def bytes(self, tokens: int, bytes_per_element: int = 2) -> int:
        """Bytes of `tokens` stored tokens, exactly (a quantized cache keeps its most recent tokens in full
        precision, `bytes_per_element` each)."""
        if self.quant is None:
            return tokens * int(self.bytes_per_token(bytes_per_element))
        per_head = self.quant.bytes(tokens, self.key_features, self.value_features, bytes_per_element)
        return self.storage_heads * per_head + 4 * self.k_scale_heads * tokens


def cache_layout(*, num_kv_heads: int, head_dim: int, key_components: int, value_components: int | None = None,
                 value_latent_dim: int | None = None, hlc: bool = True, qk_norm: bool = False,
                 kv_quant: KVQuant | None = None) -> CacheLayout:
    """The layout of a layer with M_K key components and either M_V value components or a value latent of
    width R. A layer caches its components (absorbed decode) when that holds fewer bytes than the h
    composite heads; otherwise (no HLC, or nothing compressed) it caches the h composite heads.
    `kv_quant`: store them quantized."""
    h, d = num_kv_heads, head_dim
    if (value_components is None) == (value_latent_dim is None):
        raise ValueError("give a layer's value cache as exactly one of value_components or value_latent_dim")
    value_shape = (1, value_latent_dim) if value_latent_dim is not None else (value_components, d)
    if kv_quant is not None:
        kv_quant.check_features(d, "head_dim")
        if value_latent_dim is not None:
            kv_quant.check_features(value_latent_dim, "the value latent width", latent=True)
    if not hlc or (key_components >= h and math.prod(value_shape) >= h * d):
        return CacheLayout(absorbed=False, key_shape=(h, d), value_shape=(h, d), quant=kv_quant)
    return CacheLayout(absorbed=True, key_shape=(key_components, d), value_shape=value_shape,
                       k_scale_heads=h if qk_norm else 0, quant=kv_quant)


def _capacity(needed: int, hint: int, multiple: int = 1) -> int:
    """Tokens to allocate for `needed`: the reserved `hint` when it suffices, else whole growth blocks;
    rounded up to `multiple`."""
    tokens = hint if needed <= hint else -(-needed // GROWTH_BLOCK) * GROWTH_BLOCK
    return -(-tokens // multiple) * multiple


class QuantizedStore:
    """One layer's keys and values in (B, G, S, E) storage heads: the oldest whole groups of tokens as codes
    with float16 scales and zero points (keys per channel, values per token), the rest in a full-precision
    tail of at most `residual + group_size - 1` tokens."""

    _NAMES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_tail", "v_tail")

    def __init__(self, quant: KVQuant, capacity_hint: int = 0):
        self.quant, self.capacity_hint = quant, capacity_hint
        self.quantized = 0  # Q: tokens held as codes (a multiple of the group size)
        self.tail_len = 0
        for name in self._NAMES:
            setattr(self, name, None)

    def buffers(self) -> list[str]:
        return [name for name in self._NAMES if getattr(self, name) is not None]

    def _reserve(self, needed: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Room for `needed` quantized tokens; k, v: (B, G, T, E) examples of the incoming tokens."""
        q = self.quant
        g = q.group_size
        if self.k_tail is None:
            q.check_features(v.shape[3], "the cached value width per storage head", latent=True)
            self.k_tail = k.new_empty((*k.shape[:2], q.residual + g, k.shape[3]))
            self.v_tail = v.new_empty((*v.shape[:2], q.residual + g, v.shape[3]))
        if self.k_codes is not None and needed <= self.k_codes.shape[2]:
            return
        cap = _capacity(max(needed, 1), self.capacity_hint, g)
        (b, heads, _, ek), ev = k.shape, v.shape[3]
        u8, f16 = dict(dtype=torch.uint8, device=k.device), dict(dtype=torch.float16, device=k.device)
        w, vg = value_plane_width(ev), q.value_group(ev)
        planes = (b, heads, ev // w * q.bits // 4, cap, w // 2)  # value codes as planes (`to_planes`)
        shapes = {"k_codes": ((b, heads, cap, q.code_bytes(ek)), u8), "k_scale": ((b, heads, cap // g, ek), f16),
                  "k_zero": ((b, heads, cap // g, ek), f16), "v_codes": (planes, u8),
                  "v_scale": ((b, heads, cap, ev // vg), f16), "v_zero": ((b, heads, cap, ev // vg), f16)}
        for name, (shape, kw) in shapes.items():
            new = torch.empty(shape, **kw)
            old = getattr(self, name)
            if old is not None and self.quantized:
                rows = self.quantized // g if name in ("k_scale", "k_zero") else self.quantized
                if name == "v_codes":  # tokens are the planes' rows
                    new[..., :rows, :].copy_(old[..., :rows, :])
                else:
                    new[:, :, :rows].copy_(old[:, :, :rows])
            setattr(self, name, new)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append (B, G, T, E) keys and values: into the tail, then the oldest whole groups beyond the
        residual window are quantized."""
        q, t = self.quant, k.shape[2]
        total = self.tail_len + t
        n = q.quantized_tokens(total)  # tokens of the tail + new ones that become codes now
        self._reserve(self.quantized + n, k, v)
        if n == 0:
            self.k_tail[:, :, self.tail_len : total].copy_(k)
            self.v_tail[:, :, self.tail_len : total].copy_(v)
            self.tail_len = total
            return
        old = self.tail_len
        pending_k = torch.cat([self.k_tail[:, :, :old], k], dim=2) if old else k  # (B, G, total, E)
        pending_v = torch.cat([self.v_tail[:, :, :old], v], dim=2) if old else v
        a, g = self.quantized, q.group_size
        codes, scale, zero = quantize_keys(pending_k[:, :, :n], q.bits, g)
        self.k_codes[:, :, a : a + n], self.k_scale[:, :, a // g : (a + n) // g] = codes, scale
        self.k_zero[:, :, a // g : (a + n) // g] = zero
        codes, scale, zero = quantize_values(pending_v[:, :, :n], q.bits, q.value_group(v.shape[3]))
        self.v_codes[..., a : a + n, :], self.v_scale[:, :, a : a + n], self.v_zero[:, :, a : a + n] = codes, scale, zero
        self.k_tail[:, :, : total - n].copy_(pending_k[:, :, n:])
        self.v_tail[:, :, : total - n].copy_(pending_v[:, :, n:])
        self.quantized, self.tail_len = a + n, total - n

    def views(self) -> tuple[QuantizedTokens, QuantizedTokens]:
        """The stored keys and values, (B, G, S, E) each, as the decode kernels read them."""
        q, n, g = self.quant, self.quantized, self.quant.group_size
        keys = QuantizedTokens(self.k_codes[:, :, :n], self.k_scale[:, :, : n // g], self.k_zero[:, :, : n // g],
                               self.k_tail[:, :, : self.tail_len], q.bits, g, per_channel=True)
        values = QuantizedTokens(self.v_codes[..., :n, :], self.v_scale[:, :, :n], self.v_zero[:, :, :n],
                                 self.v_tail[:, :, : self.tail_len], q.bits, q.value_group(self.v_tail.shape[3]),
                                 per_channel=False)
        return keys, values

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens. Tokens of a group cut through move back to the tail dequantized."""
        if length >= self.quantized:
            self.tail_len = length - self.quantized
            return
        start = length // self.quant.group_size * self.quant.group_size
        keys, values = self.views()
        kept_k, kept_v = keys.read(start, self.quantized)[:, :, : length - start], values.read(start, length)
        self.k_tail[:, :, : length - start].copy_(kept_k)
        self.v_tail[:, :, : length - start].copy_(kept_v)
        self.quantized, self.tail_len = start, length - start

    def reset(self) -> None:
        self.quantized = self.tail_len = 0

    def bytes(self, used: bool) -> int:
        """Bytes of the whole allocation, or (`used`) of the stored tokens only."""
        if not used:
            return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.buffers())
        if self.k_codes is None:
            return 0
        keys, values = self.views()
        tensors = [keys.codes, keys.scale, keys.zero, keys.tail, values.codes, values.scale, values.zero, values.tail]
        return sum(x.numel() * x.element_size() for x in tensors)


class MEACacheLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int = 0, kv_quant: KVQuant | None = None):
        super().__init__()
        self.capacity_hint = capacity
        self.length = 0
        self.k_scale: torch.Tensor | None = None
        self.heads_first = False
        self.kv_quant = kv_quant  # forced on this layer (else what the attention layer asks for)
        self.store: QuantizedStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _tokens(self, x: torch.Tensor, start: int, end: int | None) -> torch.Tensor:
        """Tokens [start, end) of a stored tensor: keys/values (4-D) in the layer's layout, k_scale (3-D)
        always token-major."""
        if self.heads_first and x.dim() == 4:
            return x[:, :, start:end]
        return x[:, start:end]

    def _grow(self, old: torch.Tensor | None, like: torch.Tensor, new_capacity: int) -> torch.Tensor:
        """A larger buffer for `like`'s kind of tensor, (B, T, heads, D) or (B, T, h), holding `old`'s tokens."""
        b = like.shape[0]
        if self.heads_first and like.dim() == 4:
            new = like.new_empty((b, like.shape[2], new_capacity, like.shape[3]))
        else:
            new = like.new_empty((b, new_capacity, *like.shape[2:]))
        if old is not None and self.length:
            self._tokens(new, 0, self.length).copy_(self._tokens(old, 0, self.length))
        return new

    def _reserve(self, needed: int, like_k: torch.Tensor | None, like_v: torch.Tensor | None,
                 like_scale: torch.Tensor | None):
        """Room for `needed` tokens in the float buffers given (None: not stored here)."""
        for name, like in (("keys", like_k), ("values", like_v), ("k_scale", like_scale)):
            old = getattr(self, name)
            capacity = 0 if old is None else old.shape[2 if self.heads_first and old.dim() == 4 else 1]
            if like is not None and needed > capacity:
                setattr(self, name, self._grow(old, like, _capacity(needed, self.capacity_hint)))

    def update(self, key_states, value_states, *args, k_scale: torch.Tensor | None = None, heads_first: bool = False,
               quant: KVQuant | None = None, **kwargs):
        """Append (B, T, h', D) component keys/values (and (B, T, h) k_scale); return the cached keys and
        values as (B, S, h', D) views of the storage (`heads_first`, fixed by the first update: store
        head-major). Quantized (`quant`, fixed by the first update, unless the cache forces one): return them as
        `QuantizedTokens` in (B, G, S, E) storage heads (G = h head-major, else one head of all components)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.heads_first = heads_first
            quant = self.kv_quant or quant
            self.store = QuantizedStore(quant, self.capacity_hint) if quant is not None else None
        t = key_states.shape[1]
        end = self.length + t
        if self.store is not None:
            self._reserve(end, None, None, k_scale)
            if k_scale is not None:
                self.k_scale[:, self.length : end].copy_(k_scale)
            self.store.append(self._storage_heads(key_states), self._storage_heads(value_states))
            self.length = end
            return self.store.views()
        self._reserve(end, key_states, value_states, k_scale)
        for store, new in ((self.keys, key_states), (self.values, value_states), (self.k_scale, k_scale)):
            if new is not None:
                self._tokens(store, self.length, end).copy_(new.transpose(1, 2) if self.heads_first and new.dim() == 4
                                                            else new)
        self.length = end
        k, v = self._tokens(self.keys, 0, end), self._tokens(self.values, 0, end)
        return (k.transpose(1, 2), v.transpose(1, 2)) if self.heads_first else (k, v)

    def _storage_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, heads, D) -> (B, G, T, E): h heads head-major, or one head of all components."""
        return x.transpose(1, 2) if self.heads_first else x.flatten(2)[:, None]

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
        names = ["keys", "values"] if self.store is None else []
        return names + (["k_scale"] if self.k_scale is not None else [])

    def _apply_batch(self, fn) -> None:
        for name in self._buffers():
            setattr(self, name, fn(getattr(self, name)))
        if self.store is not None:
            for name in self.store.buffers():
                setattr(self.store, name, fn(getattr(self.store, name)))

    def reset(self) -> None:
        self.length = 0
        if self.store is not None:
            self.store.reset()

    def crop(self, max_length: int) -> None:
        """As transformers' caches: a negative `max_length` removes that many tokens, a positive one keeps the
        first `max_length` tokens (0 is a no-op: `generate` calls crop(0))."""
        if max_length == 0:
            return
        length = max(0, self.length + max_length) if max_length < 0 else min(max_length, self.length)
        if self.store is not None:
            self.store.crop(length)
        self.length = length

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
        stored = sum(self._tokens(getattr(self, n), 0, tokens).numel() * getattr(self, n).element_size()
                     for n in self._buffers() if getattr(self, n) is not None)
        return stored + (self.store.bytes(used=tokens is not None) if self.store is not None else 0)

    def bytes_held(self) -> int:
        """Bytes of the tensors this layer holds (its whole allocation)."""
        return self._bytes(None)

    def bytes_used(self) -> int:
        """Bytes of the `length` tokens actually stored."""
        return self._bytes(self.length)


class MEACache(Cache):
    """One `MEACacheLayer` per decoder layer. `capacity`: tokens to preallocate per layer (0: grow).
    `kv_quant`: store every layer quantized so (else each layer as its model's config says)."""

    def __init__(self, num_layers: int, capacity: int = 0, kv_quant: KVQuant | None = None):
        super().__init__(layers=[MEACacheLayer(capacity, kv_quant) for _ in range(num_layers)])

    def bytes_held(self) -> int:
        return sum(layer.bytes_held() for layer in self.layers)

    def bytes_used(self) -> int:
        return sum(layer.bytes_used() for layer in self.layers)


class _PlainQuantizedLayer(MEACacheLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' convention: (B, H, T, D) in, the keys and values to attend to out: the exact new
        tokens at the prefill, afterwards every stored token dequantized."""
        past = self.length
        k, v = super().update(key_states.transpose(1, 2), value_states.transpose(1, 2), heads_first=True)
        return (key_states, value_states) if past == 0 else (k.dequantize(), v.dequantize())


class PlainQuantizedCache(MEACache):
    """The quantized storage of `MEACache` behind transformers' own attention layers (Llama, Qwen, ...): the
    same codes, scales and tail as an MEA model at h' = h holds, for the original model unchanged. Those
    layers attend to what `update` returns, so each decode step dequantizes the whole cache of a layer (a
    transient copy): for measuring quality and bytes held; MEA models read the codes block by block."""

    def __init__(self, num_layers: int, kv_quant: KVQuant):
        Cache.__init__(self, layers=[_PlainQuantizedLayer(0, kv_quant) for _ in range(num_layers)])


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
