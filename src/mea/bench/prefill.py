"""Prefill speed: time to run a prompt of `context` tokens through each system (see `systems`) and fill
its cache, interleaved in rounds; tokens/s and the ratio to transformers' Llama. Only the last position's
logits are computed, as in `generate`.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..machine import machine_header
from ..markdown import markdown_table
from .charts import plot_vs_context
from .systems import LLAMA, build_systems
from .timing import synchronize


@torch.no_grad()
def bench_prefill(*, preset: str = "smollm2-135m", contexts=(512, 2048), budgets=(0.67, 0.5, 0.33), batch: int = 1,
                  repeats: int = 3, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dev = torch.device(device)
    systems = build_systems(preset, budgets, max_len=max(contexts) + 8, device=dev, dtype=getattr(torch, dtype))
    vocab = systems[LLAMA].config.vocab_size
    results = []
    for context in contexts:
        ids = torch.randint(0, vocab, (batch, context), device=dev)
        for model in systems.values():  # warm-up
            model(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)
        times: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(repeats):  # interleaved rounds
            for name, model in systems.items():
                synchronize(dev)
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                synchronize(dev)
                times[name].append(time.perf_counter() - t0)
        llama = statistics.median(times[LLAMA])
        for name, ts in times.items():
            sec = statistics.median(ts)
            results.append(dict(system=name, context=context, batch=batch, ms=sec * 1e3,
                                tokens_per_s=batch * context / sec, vs_llama=llama / sec, all_ms=[t * 1e3 for t in ts]))
    return {
        "benchmark": "prefill",
        "machine": machine_header(dev),
        "settings": dict(preset=preset, contexts=list(contexts), budgets=list(budgets), batch=batch, repeats=repeats,
                         dtype=dtype, seed=seed),
        "results": results,
    }


def markdown(result: dict) -> str:
    return markdown_table(["context", "system", "ms (median)", "tokens/s", "vs Llama"],
                          [[r["context"], r["system"], f"{r['ms']:.0f}", f"{r['tokens_per_s']:.0f}",
                            f"{r['vs_llama']:.2f}×"] for r in result["results"]])


def plot(result: dict, path) -> None:
    plot_vs_context(result["results"], [("prefill throughput", lambda r: r["tokens_per_s"], "tokens / s",
                                         lambda r: True)], path)
