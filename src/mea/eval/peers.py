"""The KV-compression alternatives measured beside MEA, as `CacheSystem`s built from a short name:

    default                     the model's own cache (DynamicCache, or MEACache for an MEA model)
    quanto-4, quanto-2          transformers' QuantizedCache, optimum-quanto backend, 4 / 2 bits
    hqq-4, hqq-2                the same with the HQQ backend
    kvpress-PRESS-KEPT          an NVIDIA kvpress press pruning the context at prefill to the fraction KEPT
                                (PRESS: streamingllm, snapkv, expectedattention, knorm), e.g. kvpress-snapkv-0.5

QuantizedCache keeps transformers' defaults (groups of 64 channels, a full-precision residual of up to
128 recent tokens). kvpress needs transformers < 5.3: it runs in the `.venv-peers` environment (`make peers`).
"""

from __future__ import annotations

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
    raise ValueError(f"unknown cache system {name!r}; use default, quanto-4/2, hqq-4/2 or kvpress-PRESS-KEPT")


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
    return lambda model: instance(model)
