"""Memory actually used while decoding, vs context: for each system (see `systems`) and context, a fresh
process builds the model, fills its cache to the context and decodes a few tokens; the result is the peak
memory those steps add on top of the weights, next to the KV bytes the cache holds. Whether a cache holds
the bytes its configuration predicts is checked on caches grown by a real `generate()` (`kv_check`). On CPU the peak is the process's resident-set high-water mark (reset after the
model is built, Linux `clear_refs`); on CUDA it is `max_memory_allocated`.
"""

from __future__ import annotations

import ctypes
import gc

import torch

from . import kv_check
from ..cache import cache_bytes_held
from ..machine import available_memory, machine_header
from ..markdown import markdown_table
from .charts import plot_vs_context
from .systems import build_systems, fill_cache, predicted_kv_bytes, system_specs
from .timing import in_fresh_process


def _rss_peak_reset() -> int:
    """Return freed heap memory to the system (so the cache cannot reuse it unseen), reset the resident-set
    high-water mark to the current RSS, and return that RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement may then undercount reused memory
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


@torch.no_grad()
def measure_point(preset: str, budgets, name: str, batch: int, context: int, steps: int, device: str, dtype: str,
                  seed: int, kv_bits=()) -> dict:
    """Peak bytes that filling the cache and `steps` decode steps add to the built model (one system)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = build_systems(preset, budgets, max_len=context + steps + 8, device=dev, dtype=getattr(torch, dtype),
                          only=[name], kv_bits=kv_bits)[name]
    token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = _rss_peak_reset()
    cache = fill_cache(model, batch, context, context + steps)
    for _ in range(steps):
        model(input_ids=token, cache=cache, use_cache=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = _status_kb("VmHWM") * 1024 - before
    held = cache_bytes_held(cache)
    predicted = predicted_kv_bytes(model, batch, context + steps)
    return dict(system=name, context=context, batch=batch, peak_bytes=peak, kv_bytes=held,
                kv_bytes_predicted=predicted, peak_over_kv=peak / held, peak_over_predicted=peak / predicted)


def bench_memory(*, preset: str = "smollm2-135m", contexts=(1024, 4096, 16384), budgets=(0.67, 0.5, 0.33),
                 batch: int = 1, steps: int = 4, device: str = "cpu", dtype: str = "float32", kv_bits=(),
                 seed: int = 0) -> dict:
    """`kv_bits`: also every MEA system with its cache quantized to these bits (see `systems`)."""
    kv_bits = tuple(kv_bits)
    names = list(system_specs(preset, budgets, kv_bits))
    results = []
    for context in contexts:
        for name in names:  # a fresh process per point: peaks of earlier points cannot leak in
            results.append(in_fresh_process(measure_point, preset, list(budgets), name, batch, context, steps, device,
                                            dtype, seed, kv_bits))
    torch.manual_seed(seed)
    systems = build_systems(preset, budgets, max_len=kv_check.PROMPT + kv_check.NEW_TOKENS + 8,
                            device=torch.device(device), dtype=getattr(torch, dtype), kv_bits=kv_bits)
    return {
        "benchmark": "memory",
        "machine": {**machine_header(torch.device(device)), "available_bytes": available_memory(torch.device(device))},
        "settings": dict(preset=preset, contexts=list(contexts), budgets=list(budgets), batch=batch, steps=steps,
                         dtype=dtype, kv_bits=list(kv_bits), seed=seed),
        "results": results,
        "kv_generate": kv_check.check_systems(systems),
        "note": ("peak: memory that filling the cache to the context and decoding `steps` tokens adds on top of the "
                 "built model (" + ("CUDA max_memory_allocated" if device.startswith("cuda") else
                                    "CPU resident-set high-water mark") + ")"),
    }


def markdown(result: dict) -> str:
    table = markdown_table(["context", "system", "peak MiB added", "KV MiB held", "KV MiB predicted", "peak / KV",
                            "peak / predicted"],
                           [[r["context"], r["system"], f"{r['peak_bytes'] / 2**20:.1f}", f"{r['kv_bytes'] / 2**20:.1f}",
                             f"{r['kv_bytes_predicted'] / 2**20:.1f}", f"{r['peak_over_kv']:.2f}",
                             f"{r['peak_over_predicted']:.2f}"] for r in result["results"]])
    return table + ("\n" + kv_check.markdown(result["kv_generate"]) if "kv_generate" in result else "")


def plot(result: dict, path) -> None:
    def keep(r):
        return True

    plot_vs_context(result["results"], [
        ("peak memory added by the cache and decoding", lambda r: r["peak_bytes"] / 2**20, "MiB", keep),
        ("KV cache held", lambda r: r["kv_bytes"] / 2**20, "MiB", keep)], path)
