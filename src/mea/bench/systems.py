"""The systems every inference benchmark compares, built from one set of weights: transformers'
`LlamaForCausalLM` with its own cache, our model with h' = h, our folded model (HLC folded into k/v:
plain GQA through our code) and compressed models at KV budgets; with `kv_bits`, also our model at h' = h
and every compressed model with the cache quantized to those bits ("... int4"), beside the same model
with its cache in the compute dtype. Also: caches filled to a context length without prefill compute, and
the KV bytes a system should hold.
"""

from __future__ import annotations


import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ..cache import MEACache
from ..convert.fold import fold_hlc, plain_config_fields
from ..models import MEAForCausalLM, make_config
from ..ops.kvquant import group_size_for

LLAMA = "transformers-llama"
FILL_CHUNK = 256  # tokens per cache write when filling an MEACache


def heads_for_budget(num_kv_heads: int, num_layers: int, budget: float) -> list[int]:
    """Per-layer h' keeping `budget` of the KV cache: round(budget h L) component heads in all, spread evenly
    over the layers (which layers get the extra head does not change speed or bytes)."""
    if not 0 < budget <= 1:
        raise ValueError(f"a KV budget is the fraction of the cache kept, in (0, 1]; got {budget}")
    total = max(num_layers, round(budget * num_kv_heads * num_layers))
    base, extra = divmod(total, num_layers)
    return [base + ((i + 1) * extra // num_layers - i * extra // num_layers) for i in range(num_layers)]


def system_specs(preset: str, budgets, kv_bits=()) -> dict[str, tuple[list[int] | None, int | None]]:
    """name -> (per-layer h' of each compressed system (None for the uncompressed ones), cache bits (None: the
    compute dtype)), in benchmark order."""
    cfg = make_config(preset, "mea-no-groupnorm")
    h, layers = cfg.num_key_value_heads, cfg.num_hidden_layers
    specs: dict[str, tuple[list[int] | None, int | None]] = {LLAMA: (None, None), f"mea h'={h}": (None, None),
                                                             "mea folded": (None, None)}
    specs.update((f"mea h'={h} int{bits}", (None, bits)) for bits in kv_bits)
    for budget in budgets:
        heads = heads_for_budget(h, layers, budget)
        kept = sum(heads) / (h * layers)
        if kept < 1:
            specs[f"mea KV -{1 - kept:.0%}"] = (heads, None)
            specs.update((f"mea KV -{1 - kept:.0%} int{bits}", (heads, bits)) for bits in kv_bits)
    return specs


def float_counterpart(name: str) -> str | None:
    """The system whose cache a quantized system's replaces ("mea KV -50% int4" -> "mea KV -50%")."""
    base, _, bits = name.rpartition(" int")
    return base if base and bits.isdigit() else None


def build_systems(preset: str, budgets, *, max_len: int, device, dtype, only: list[str] | None = None,
                  kv_bits=()) -> dict:
    """name -> model (`only`: build just these). The reference model has random weights (seeded by the
    caller); Llama, the folded model and the quantized-cache model at h' = h compute the same function (up to
    the cache's rounding). Compressed models keep fewer component heads of the same shape (their outputs
    differ; their cost is what is measured); a compressed model and its quantized-cache twin share weights."""
    with torch.device(device):  # weights made where they run: a 1B model's random init on one CPU takes minutes
        cfg = make_config(preset, "mea-no-groupnorm", max_position_embeddings=max_len)
        full = MEAForCausalLM(cfg).eval()
        specs = {name: spec for name, spec in system_specs(preset, budgets, kv_bits).items()
                 if only is None or name in only}
        folded = fold_hlc(full) if {LLAMA, "mea folded"} & set(specs) else None
        systems, weights = {}, {}
        for name, (heads, bits) in specs.items():
            if name == LLAMA:
                model = LlamaForCausalLM(LlamaConfig(**plain_config_fields(cfg), attn_implementation="sdpa")).eval()
                model.load_state_dict(folded.state_dict(), strict=True)
            elif name == "mea folded":
                model = folded
            elif heads is None and bits is None:
                model = full
            else:
                model = MEAForCausalLM(make_config(preset, "mea-no-groupnorm", max_position_embeddings=max_len,
                                                   mea_num_component_heads=heads, mea_kv_bits=bits,
                                                   mea_kv_group_size=group_size_for(cfg.head_dim))).eval()
                key = tuple(heads) if heads is not None else None
                if key is None:
                    model.load_state_dict(full.state_dict())
                elif key in weights:
                    model.load_state_dict(weights[key])
                weights.setdefault(key, model.state_dict())
            systems[name] = model.to(device, dtype)
        return systems


def fill_cache(model, batch: int, context: int, capacity: int):
    """A cache holding `context` random tokens (decode cost does not depend on the values): an MEACache
    preallocated to `capacity` for our models, as `generate` makes it; transformers' DynamicCache for
    Llama, holding the context as one tensor per layer (as after its prefill) and growing by concatenation,
    as in its `generate`."""
    cfg = model.config
    p = next(model.parameters())
    if isinstance(model, MEAForCausalLM):
        cache = MEACache(cfg.num_hidden_layers, capacity=capacity)
        for layer, block in zip(cache.layers, model.model.layers):
            layout = block.self_attn.cache_layout  # what the layer itself would store and decode from
            for start in range(0, context, FILL_CHUNK):  # small temporaries: the memory benchmark sees the cache
                t = min(FILL_CHUNK, context - start)
                k, v = (torch.randn(batch, t, *shape, device=p.device, dtype=p.dtype)
                        for shape in (layout.key_shape, layout.value_shape))
                scale = torch.ones(batch, t, layout.k_scale_heads, device=p.device) if layout.k_scale_heads else None
                layer.update(k, v, k_scale=scale, heads_first=layout.heads_first, quant=layout.quant)  # stored
        return cache
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        kv = torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, device=p.device, dtype=p.dtype)
        cache.update(kv, kv.clone(), i)
    return cache


def decode_kernels(model) -> dict[str, int]:
    """Layers per decode kernel, as the model's layers will dispatch (`MEAConfig.cache_layouts`)."""
    if not isinstance(model, MEAForCausalLM):
        return {"transformers": model.config.num_hidden_layers}
    kernels = [layout.kernel for layout in model.config.cache_layouts()]
    return {k: kernels.count(k) for k in sorted(set(kernels))}


def predicted_kv_bytes(model, batch: int, tokens: int) -> int:
    """What the configuration says a cache of `tokens` tokens should hold: sum over layers of 2 h' D per
    token (h' = h for Llama), plus MEA's k-scales where they apply; a quantized cache its codes, scales and
    full-precision tail (`MEAConfig.kv_cache_bytes`)."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    if isinstance(model, MEAForCausalLM):
        return batch * cfg.kv_cache_bytes(tokens, bytes_per_element=elem)
    return batch * tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elem


def weight_bytes(model) -> int:
    """Bytes of weights read per decode step: every parameter once (a tied embedding is one parameter)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
