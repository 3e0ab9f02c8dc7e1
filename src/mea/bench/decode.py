"""Decoding speed from a long cache, side by side in one run: transformers' `LlamaForCausalLM` with its
own cache, our model with h' = h, our folded model (HLC folded into k/v: plain GQA through our code), and
compressed models with fewer component heads; time per token and the cache bytes actually held, against
the memory-bandwidth bound (weights + cache bytes read per token) / measured bandwidth.

Systems share one set of weights (the h' = h model with identity HLC), so they compute the same
function where the cache is not compressed. Caches are filled with random keys/values of the right
shape (decode cost does not depend on the values), so long contexts need no prefill compute.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ..cache import MEACache
from ..convert.fold import fold_hlc, plain_config_fields
from ..models import MEAForCausalLM, make_config
from ..plotting import pyplot, save_figure
from .machine import machine_header, memory_bandwidth, synchronize


def fill_cache(model, batch: int, context: int, capacity: int):
    """A cache holding `context` random tokens: an MEACache (preallocated to `capacity`) for our models,
    transformers' DynamicCache (which grows by concatenation, as in its generate) for Llama."""
    cfg = model.config
    p = next(model.parameters())
    if isinstance(model, MEAForCausalLM):
        cache = MEACache(cfg.num_hidden_layers, capacity=capacity)
        for layer, block in zip(cache.layers, model.model.layers):
            attn = block.self_attn
            kv = torch.randn(batch, context, attn.num_component_heads, cfg.head_dim, device=p.device, dtype=p.dtype)
            scale = None
            if cfg.use_qk_norm and attn.caches_components:
                scale = torch.ones(batch, context, cfg.num_key_value_heads, device=p.device)
            layer.update(kv, kv.clone(), k_scale=scale, heads_first=not attn.caches_components)
        return cache
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        kv = torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, device=p.device, dtype=p.dtype)
        cache.update(kv, kv.clone(), i)
    return cache


def cache_bytes(cache) -> int:
    if isinstance(cache, MEACache):
        return cache.bytes_used()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def time_per_token(model, *, batch: int, context: int, steps: int) -> tuple[float, int]:
    """Median seconds per decode step at `context` cached tokens, and the cache bytes held."""
    dev = next(model.parameters()).device
    cache = fill_cache(model, batch, context, context + steps + 1)
    token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    model(input_ids=token, cache=cache, use_cache=True)  # warm-up step
    times = []
    for _ in range(steps):
        synchronize(dev)
        t0 = time.perf_counter()
        model(input_ids=token, cache=cache, use_cache=True)
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), cache_bytes(cache)


def decode_systems(preset: str, component_heads, *, max_len: int, device, dtype) -> dict:
    """name -> model. The compressed models keep the first h' component heads of the same weights
    (their outputs differ; their cost is what is measured)."""
    cfg = make_config(preset, "mea-no-groupnorm", max_position_embeddings=max_len)
    full = MEAForCausalLM(cfg).eval()
    llama = LlamaForCausalLM(LlamaConfig(**plain_config_fields(cfg), attn_implementation="sdpa")).eval()
    llama.load_state_dict(fold_hlc(full).state_dict(), strict=True)
    systems = {"transformers-llama": llama, f"mea h'={cfg.num_key_value_heads}": full, "mea folded": fold_hlc(full)}
    for m in component_heads:
        if m < cfg.num_key_value_heads:
            systems[f"mea h'={m}"] = MEAForCausalLM(make_config(preset, "mea-no-groupnorm", max_position_embeddings=max_len,
                                                                mea_num_component_heads=m)).eval()
    return {name: model.to(device, dtype) for name, model in systems.items()}


def bench_decode(*, preset: str = "smollm2-135m", contexts=(1024, 4096, 16384, 32768), component_heads=(2, 1),
                 batches=(1, 8), steps: int = 10, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dev, dt = torch.device(device), getattr(torch, dtype)
    bandwidth = memory_bandwidth(dev)
    systems = decode_systems(preset, component_heads, max_len=max(contexts) + steps + 8, device=dev, dtype=dt)
    results = []
    for batch in batches:
        for context in contexts:
            for name, model in systems.items():  # interleaved: every system at each point in turn
                seconds, kv_bytes = time_per_token(model, batch=batch, context=context, steps=steps)
                # every weight is read once per step (a tied embedding is one parameter, read by lm_head)
                weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                bound = (weight_bytes + kv_bytes) / bandwidth
                results.append(dict(system=name, context=context, batch=batch, ms_per_token=seconds * 1e3,
                                    tokens_per_s=batch / seconds, kv_bytes=kv_bytes, weight_bytes=weight_bytes,
                                    bound_ms=bound * 1e3, of_bound=seconds / bound))
    by = {(r["system"], r["context"], r["batch"]): r for r in results}
    names = list(systems)
    speedups = {f"{n} vs transformers-llama @ {c} x{b}": by[("transformers-llama", c, b)]["ms_per_token"]
                / by[(n, c, b)]["ms_per_token"] for n in names[1:] for c in contexts for b in batches}
    return {
        "benchmark": "decode",
        "machine": {**machine_header(dev), "read_bandwidth_GBps": bandwidth / 1e9},
        "settings": dict(preset=preset, contexts=list(contexts), batches=list(batches), steps=steps, dtype=dtype,
                         component_heads=list(component_heads)),
        "results": results,
        "speedups": speedups,
    }


def markdown(result: dict) -> str:
    lines = ["| batch | context | system | ms/token | tokens/s | KV bytes held | bound ms | × bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['system']} | {r['ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['kv_bytes']:,} | {r['bound_ms']:.2f} | {r['of_bound']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Time per token and KV bytes vs context, one panel pair per batch size."""
    plt = pyplot()

    batches = result["settings"]["batches"]
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    systems = list(dict.fromkeys(r["system"] for r in result["results"]))
    for col, b in enumerate(batches):
        for name in systems:
            rs = sorted((r for r in result["results"] if r["system"] == name and r["batch"] == b),
                        key=lambda r: r["context"])
            ctx = [r["context"] for r in rs]
            axes[0][col].plot(ctx, [r["ms_per_token"] for r in rs], marker="o", label=name)
            axes[1][col].plot(ctx, [r["kv_bytes"] / 2**20 for r in rs], marker="o", label=name)
        axes[0][col].set_title(f"batch {b}: time per token", fontsize=9)
        axes[1][col].set_title(f"batch {b}: KV cache held", fontsize=9)
        axes[0][col].set_ylabel("ms / token")
        axes[1][col].set_ylabel("MiB")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, dpi=110)
