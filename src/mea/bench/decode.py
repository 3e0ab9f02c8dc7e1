"""Decoding speed from a long cache, side by side in one run (see `systems`): time per token and the
cache bytes actually held, against the memory-bandwidth bound (weights + cache bytes read per token) /
measured bandwidth. Caches are filled with random keys/values of the right shape (decode cost does not
depend on the values), so long contexts need no prefill compute. The KV bytes each system's cache holds
against its configuration's prediction are checked on caches grown by a real `generate()` (`kv_check`).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from . import kv_check
from ..cache import cache_bytes_held
from ..machine import available_memory, machine_header
from ..markdown import markdown_table
from ..ops.attention import cpu_key_read, cpu_value_read
from .charts import plot_vs_context
from .systems import (
    LLAMA,
    build_systems,
    decode_kernels,
    fill_cache,
    float_counterpart,
    predicted_kv_bytes,
    weight_bytes,
)
from .timing import memory_bandwidth, rotated, synchronize


@torch.no_grad()
def timed_steps(model, cache, *, batch: int, steps: int) -> list[float]:
    """Seconds of each of `steps` decode steps (after one untimed warm-up step)."""
    dev = next(model.parameters()).device
    token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    model(input_ids=token, cache=cache, use_cache=True)
    times = []
    for _ in range(steps):
        synchronize(dev)
        t0 = time.perf_counter()
        model(input_ids=token, cache=cache, use_cache=True)
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    return times


def bench_decode(*, preset: str = "smollm2-135m", contexts=(1024, 4096, 16384, 32768), budgets=(0.67, 0.5, 0.33),
                 batches=(1, 8), steps: int = 5, rounds: int = 3, device: str = "cpu", dtype: str = "float32",
                 kv_bits=(8, 4), seed: int = 0) -> dict:
    """Median time per token at each (batch, context) point for every system. Where memory allows, every
    system's cache is held at once and the systems take turns for `rounds` rounds of `steps` steps (the
    order rotating), so slow drifts of the machine hit all of them alike; otherwise each system runs its
    rounds in turn with only its own cache alive. `kv_bits`: also every MEA system with its cache quantized to
    those bits, beside the same system with its cache in `dtype`."""
    torch.manual_seed(seed)
    dev, dt = torch.device(device), getattr(torch, dtype)
    bandwidth = memory_bandwidth(dev)
    tokens = rounds * (steps + 1)  # generated per point: the caches end at context + tokens
    systems = build_systems(preset, budgets, device=dev, dtype=dt,
                            max_len=max(max(contexts) + tokens, kv_check.PROMPT + kv_check.NEW_TOKENS) + 8,
                            kv_bits=tuple(kv_bits))
    names = list(systems)
    results, skipped = [], []
    for batch in batches:
        for context in contexts:
            final = context + tokens
            # the largest cache twice over (transformers' cache grows by concatenation: old and new alive at once)
            need = 2 * predicted_kv_bytes(systems[LLAMA], batch, final)
            free = available_memory(dev)
            if need > 0.8 * free:
                skipped.append(dict(batch=batch, context=context, reason=f"needs ~{need / 2**30:.1f} GiB for the "
                                    f"cache, more than 80% of the {free / 2**30:.1f} GiB available"))
                print(f"skipping batch {batch} x context {context}: {skipped[-1]['reason']}", file=sys.stderr)
                continue
            all_at_once = need + sum(predicted_kv_bytes(m, batch, final) for m in systems.values()) < 0.8 * free
            times: dict[str, list[float]] = {name: [] for name in names}
            held = {}
            for group in [names] if all_at_once else [[name] for name in names]:  # systems whose caches coexist
                caches = {name: fill_cache(systems[name], batch, context, final) for name in group}
                for r in range(rounds):
                    for name in rotated(group, r):
                        times[name] += timed_steps(systems[name], caches[name], batch=batch, steps=steps)
                held.update((name, cache_bytes_held(c)) for name, c in caches.items())
                del caches
            for name, model in systems.items():
                seconds = statistics.median(times[name])
                predicted, weights = predicted_kv_bytes(model, batch, final), weight_bytes(model)
                bound = (weights + held[name]) / bandwidth
                results.append(dict(system=name, context=context, batch=batch, ms_per_token=seconds * 1e3,
                                    tokens_per_s=batch / seconds, kv_bytes=held[name], kv_bytes_predicted=predicted,
                                    weight_bytes=weights, bound_ms=bound * 1e3,
                                    of_bound=seconds / bound, interleaved=all_at_once, kernels=decode_kernels(model),
                                    all_ms=[t * 1e3 for t in times[name]]))
    return {
        "benchmark": "decode",
        "machine": {**machine_header(dev), "read_bandwidth_GBps": bandwidth / 1e9,
                    **({"kv_key_read": cpu_key_read(), "kv_value_read": cpu_value_read()}
                       if kv_bits and dev.type == "cpu" else {})},
        "settings": dict(preset=preset, contexts=list(contexts), batches=list(batches), steps=steps, rounds=rounds,
                         dtype=dtype, budgets=list(budgets), kv_bits=list(kv_bits), seed=seed),
        "results": results,
        "speedups": speedups(results),
        "skipped": skipped,
        "kv_generate": kv_check.check_systems(systems),
    }


def speedups(results: list[dict]) -> dict:
    """Time-per-token ratios at each point (above 1: faster): every system vs transformers' Llama, every
    compressed system vs the folded (uncompressed, plain GQA) model, and every quantized-cache system vs the
    same model with its cache in the compute dtype."""
    by = {(r["system"], r["context"], r["batch"]): r["ms_per_token"] for r in results}
    out = {}
    for (name, context, batch), ms in by.items():
        if name != LLAMA:
            out[f"{name} vs {LLAMA} @ {context} x{batch}"] = by[(LLAMA, context, batch)] / ms
        if name.startswith("mea KV"):
            out[f"{name} vs mea folded @ {context} x{batch}"] = by[("mea folded", context, batch)] / ms
        base = float_counterpart(name)
        if base is not None:
            out[f"{name} vs {base} @ {context} x{batch}"] = by[(base, context, batch)] / ms
    return out


def markdown(result: dict) -> str:
    ratio = result["speedups"]
    rows = []
    for r in result["results"]:
        vs = ratio.get(f"{r['system']} vs {LLAMA} @ {r['context']} x{r['batch']}")
        vs_float = ratio.get(f"{r['system']} vs {float_counterpart(r['system'])} @ {r['context']} x{r['batch']}")
        rows.append([r["batch"], r["context"], r["system"], f"{r['ms_per_token']:.1f}", f"{r['tokens_per_s']:.1f}",
                     "" if vs is None else f"{vs:.2f}×", "" if vs_float is None else f"{vs_float:.2f}×",
                     f"{r['kv_bytes'] / 2**20:.1f}", f"{r['bound_ms']:.1f}", f"{r['of_bound']:.2f}"])
    table = markdown_table(["batch", "context", "system", "ms/token", "tokens/s", "vs Llama",
                            f"vs {result['settings']['dtype']} cache", "KV MiB held", "bound ms", "× bound"], rows)
    table += "".join(f"\nSkipped batch {s['batch']} x context {s['context']}: {s['reason']}.\n"
                     for s in result.get("skipped", []))
    return table + ("\n" + kv_check.markdown(result["kv_generate"]) if "kv_generate" in result else "")


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
