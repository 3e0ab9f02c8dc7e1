"""Decoding speed from a long cache: time per token at given context lengths for MEA with h' = h and
compressed h' < h, against the memory-bandwidth bound (weights + cache bytes read per token).

The cache is filled with random component heads of the right shape (decode cost does not depend on
the values), so long contexts need no prefill compute.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..cache import MEACache
from ..models import MEAForCausalLM, make_config
from .machine import machine_header, memory_bandwidth, synchronize


def fill_cache(model: MEAForCausalLM, batch: int, context: int, capacity: int) -> MEACache:
    cfg = model.config
    p = next(model.parameters())
    cache = MEACache(cfg.num_hidden_layers, capacity=capacity)
    for layer, m in zip(cache.layers, cfg.component_heads()):
        kv = torch.randn(batch, context, m, cfg.head_dim, device=p.device, dtype=p.dtype)
        scale = None
        if cfg.use_qk_norm and cfg.mea_hlc:
            scale = torch.ones(batch, context, cfg.num_key_value_heads, device=p.device)
        layer.update(kv, kv.clone(), k_scale=scale)
    return cache


@torch.no_grad()
def time_per_token(model: MEAForCausalLM, *, batch: int, context: int, steps: int) -> tuple[float, int]:
    """Median seconds per decode step at `context` cached tokens, and the cache bytes held."""
    dev = next(model.parameters()).device
    cache = fill_cache(model, batch, context, context + steps + 1)
    token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    model(input_ids=token, cache=cache)  # warm-up step
    times = []
    for _ in range(steps):
        synchronize(dev)
        t0 = time.perf_counter()
        model(input_ids=token, cache=cache)
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), cache.bytes_used()


def bench_decode(*, preset: str = "smollm2-135m", contexts=(4096, 16384), component_heads=(None, 1), batch: int = 1,
                 steps: int = 10, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dev, dt = torch.device(device), getattr(torch, dtype)
    bandwidth = memory_bandwidth(dev)
    results = []
    models = {}
    for m in component_heads:
        cfg = make_config(preset, "mea", mea_num_component_heads=m, max_position_embeddings=max(contexts) + steps + 8)
        models[f"h'={m or cfg.num_key_value_heads}"] = MEAForCausalLM(cfg).to(dev, dt).eval()
    for context in contexts:
        for name, model in models.items():  # interleaved per context
            seconds, kv_bytes = time_per_token(model, batch=batch, context=context, steps=steps)
            # every weight is read once per step (a tied embedding is one parameter, read by lm_head)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            bound = (weight_bytes + kv_bytes) / bandwidth
            results.append(dict(system=name, context=context, batch=batch, ms_per_token=seconds * 1e3,
                                kv_bytes=kv_bytes, weight_bytes=weight_bytes, bound_ms=bound * 1e3,
                                of_bound=seconds / bound))
    by = {(r["system"], r["context"]): r for r in results}
    names = list(models)
    speedups = {f"{names[0]} / {n} @ {c}": by[(names[0], c)]["ms_per_token"] / by[(n, c)]["ms_per_token"]
                for n in names[1:] for c in contexts}
    return {
        "benchmark": "decode",
        "machine": {**machine_header(dev), "read_bandwidth_GBps": bandwidth / 1e9},
        "settings": dict(preset=preset, contexts=list(contexts), batch=batch, steps=steps, dtype=dtype),
        "results": results,
        "speedups": speedups,
    }
