"""Decoding speed from a long cache, side by side in one run (see `systems`): time per token and the
cache bytes actually held, against the memory-bandwidth bound (weights + cache bytes read per token) /
measured bandwidth. Caches are filled with random keys/values of the right shape (decode cost does not
depend on the values), so long contexts need no prefill compute.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from .charts import plot_vs_context
from .machine import machine_header, memory_bandwidth, synchronize
from .systems import LLAMA, available_memory, build_systems, cache_bytes, fill_cache, predicted_kv_bytes, weight_bytes


@torch.no_grad()
def time_per_token(model, *, batch: int, context: int, steps: int) -> tuple[float, object]:
    """Median seconds per decode step at `context` cached tokens, and the cache after the steps."""
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
    return statistics.median(times), cache


def bench_decode(*, preset: str = "smollm2-135m", contexts=(1024, 4096, 16384, 32768), budgets=(0.67, 0.5, 0.33),
                 batches=(1, 8), steps: int = 10, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dev, dt = torch.device(device), getattr(torch, dtype)
    bandwidth = memory_bandwidth(dev)
    systems = build_systems(preset, budgets, max_len=max(contexts) + steps + 8, device=dev, dtype=dt)
    results, skipped = [], []
    for batch in batches:
        for context in contexts:
            tokens = context + steps + 1
            # the largest cache, twice over: transformers' cache grows by concatenation (old + new alive at once)
            need = 2 * predicted_kv_bytes(systems[LLAMA], batch, tokens)
            if need > 0.8 * available_memory(dev):
                skipped.append(dict(batch=batch, context=context, reason=f"needs ~{need / 2**30:.1f} GiB for the "
                                    f"cache, more than 80% of the {available_memory(dev) / 2**30:.1f} GiB available"))
                print(f"skipping batch {batch} x context {context}: {skipped[-1]['reason']}", file=sys.stderr)
                continue
            for name, model in systems.items():  # interleaved: every system at each point in turn
                seconds, cache = time_per_token(model, batch=batch, context=context, steps=steps)
                held, predicted = cache_bytes(cache), predicted_kv_bytes(model, batch, tokens)
                del cache
                weights = weight_bytes(model)
                bound = (weights + held) / bandwidth
                results.append(dict(system=name, context=context, batch=batch, ms_per_token=seconds * 1e3,
                                    tokens_per_s=batch / seconds, kv_bytes=held, kv_bytes_predicted=predicted,
                                    kv_error=held / predicted - 1, weight_bytes=weights, bound_ms=bound * 1e3,
                                    of_bound=seconds / bound))
    return {
        "benchmark": "decode",
        "machine": {**machine_header(dev), "read_bandwidth_GBps": bandwidth / 1e9},
        "settings": dict(preset=preset, contexts=list(contexts), batches=list(batches), steps=steps, dtype=dtype,
                         budgets=list(budgets), seed=seed),
        "results": results,
        "speedups": speedups(results, list(systems)),
        "skipped": skipped,
    }


def speedups(results: list[dict], names: list[str]) -> dict:
    """Time-per-token ratios at each point: every system vs transformers' Llama, and every compressed
    system vs the folded (uncompressed, plain GQA) model."""
    by = {(r["system"], r["context"], r["batch"]): r["ms_per_token"] for r in results}
    out = {}
    for (name, context, batch), ms in by.items():
        if name != LLAMA:
            out[f"{name} vs {LLAMA} @ {context} x{batch}"] = by[(LLAMA, context, batch)] / ms
        if name.startswith("mea KV"):
            out[f"{name} vs mea folded @ {context} x{batch}"] = by[("mea folded", context, batch)] / ms
    return out


def markdown(result: dict) -> str:
    ratio = result["speedups"]
    lines = ["| batch | context | system | ms/token | tokens/s | vs Llama | KV MiB held | KV vs predicted | bound ms "
             "| × bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        vs = ratio.get(f"{r['system']} vs {LLAMA} @ {r['context']} x{r['batch']}")
        lines.append(f"| {r['batch']} | {r['context']} | {r['system']} | {r['ms_per_token']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {'' if vs is None else f'{vs:.2f}×'} | {r['kv_bytes'] / 2**20:.1f} | "
                     f"{r['kv_error']:+.2%} | {r['bound_ms']:.1f} | {r['of_bound']:.2f} |")
    for s in result.get("skipped", []):
        lines.append(f"\nSkipped batch {s['batch']} x context {s['context']}: {s['reason']}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Per batch size: time per token, and how far each system is from the bandwidth bound; KV bytes held."""
    panels = []
    for b in result["settings"]["batches"]:
        panels.append((f"batch {b}: time per token", lambda r: r["ms_per_token"], "ms / token",
                       lambda r, b=b: r["batch"] == b))
        panels.append((f"batch {b}: time / bandwidth bound", lambda r: r["of_bound"], "× bound",
                       lambda r, b=b: r["batch"] == b))
    b0 = result["settings"]["batches"][0]
    panels.append((f"batch {b0}: KV cache held", lambda r: r["kv_bytes"] / 2**20, "MiB", lambda r: r["batch"] == b0))
    plot_vs_context(result["results"], panels, path)
