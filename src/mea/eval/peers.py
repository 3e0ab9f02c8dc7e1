"""The KV-compression alternatives measured beside MEA, as `CacheSystem`s built from a short name:

    default                     the model's own cache (DynamicCache, or MEACache for an MEA model)
    quanto-4, quanto-2          transformers' QuantizedCache, optimum-quanto backend, 4 / 2 bits
    hqq-4, hqq-2                the same with the HQQ backend
    kvpress-PRESS-KEPT          an NVIDIA kvpress press pruning the context at prefill to the fraction KEPT
                                (PRESS: streamingllm, snapkv, expectedattention, knorm), e.g. kvpress-snapkv-0.5
    mea-kv8, mea-kv4            our quantized cache (`mea.cache`; the default residual, and the default group size
                                or its largest divisor that divides head_dim): for an MEA
                                model its MEACache with those bits; for an original model the same storage
                                behind its own attention layers (`PlainQuantizedCache`), which holds exactly
                                what the model converted to MEA at h' = h would hold

QuantizedCache keeps transformers' defaults (groups of 64 channels, a full-precision residual of up to
128 recent tokens). A press with a scoring window (SnapKV: the last 64 tokens) prunes only contexts longer
than that window and keeps shorter ones whole. kvpress needs transformers < 5.3: it runs in the `.venv-peers` environment (`make peers`).
"""

from __future__ import annotations

import contextlib

from ..ops.kvquant import KV_BITS
from .protocol import CacheSystem

QUANT_BACKENDS = ("quanto", "hqq")
QUANT_BITS = (2, 4)
PRESSES = {"streamingllm": "StreamingLLMPress", "snapkv": "SnapKVPress",
           "expectedattention": "ExpectedAttentionPress", "knorm": "KnormPress"}


def is_kvpress(name: str) -> bool:
    return name.startswith("kvpress-")


def cache_system(name: str) -> CacheSystem:
    """The `CacheSystem` called `name` (see the module docstring)."""
    if name == "default":
        return CacheSystem(name)
    backend, _, rest = name.partition("-")
    if backend in QUANT_BACKENDS:
        if rest not in map(str, QUANT_BITS):
            raise ValueError(f"bad cache system {name!r}: bits must be one of {QUANT_BITS}, e.g. {backend}-4")
        return CacheSystem(name, new_cache=lambda model: _quantized_cache(model, backend, int(rest)))
    if backend == "kvpress":
        press, _, kept = rest.rpartition("-")
        if press not in PRESSES:
            raise ValueError(f"bad cache system {name!r}: press must be one of {', '.join(PRESSES)}")
        try:
            fraction = float(kept)
        except ValueError:
            fraction = -1.0
        if not 0 < fraction < 1:
            raise ValueError(f"bad cache system {name!r}: the kept fraction must be in (0, 1), e.g. kvpress-{press}-0.5")
        return CacheSystem(name, during_prefill=_press(press, fraction))
    if backend == "mea" and rest.startswith("kv"):
        if rest[2:] not in map(str, KV_BITS):
            raise ValueError(f"bad cache system {name!r}: bits must be one of {KV_BITS}, e.g. mea-kv4")
        return CacheSystem(name, new_cache=lambda model: _mea_quantized_cache(model, int(rest[2:])))
    raise ValueError(f"unknown cache system {name!r}; use default, quanto-4/2, hqq-4/2, mea-kv8/4 or "
                     "kvpress-PRESS-KEPT")


def _mea_quantized_cache(model, bits: int):
    from ..cache import MEACache, PlainQuantizedCache
    from ..ops.kvquant import DEFAULT_RESIDUAL, KVQuant, group_size_for

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    quant = KVQuant(bits=bits, group_size=group_size_for(head_dim), residual=DEFAULT_RESIDUAL)
    if getattr(cfg, "model_type", None) == "mea":
        return MEACache(cfg.num_hidden_layers, kv_quant=quant)
    return PlainQuantizedCache(cfg.num_hidden_layers, quant)


def _quantized_cache(model, backend: str, bits: int):
    from transformers import QuantizedCache

    if getattr(model.config, "model_type", None) == "mea":
        raise ValueError("QuantizedCache applies to the original (Hugging Face) model, not to an MEA checkpoint")
    return QuantizedCache(backend, model.config, nbits=bits)


def _press(press: str, kept: float):
    try:
        import kvpress
    except ImportError as e:
        raise ValueError("kvpress presses run in the peers environment: `make peers`, then use .venv-peers/bin/python "
                         f"({e})") from e
    instance = getattr(kvpress, PRESSES[press])(compression_ratio=round(1 - kept, 4))
    window = getattr(instance, "window_size", 0)

    def during_prefill(model, tokens: int):
        # SnapKV scores the context by the attention of its last `window_size` tokens and refuses a context
        # no longer than that window: such a context (a short LAMBADA passage) is kept whole
        return instance(model) if tokens > window else contextlib.nullcontext()
    return during_prefill
