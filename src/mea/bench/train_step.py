"""Training-step throughput (forward + backward) and peak memory of every attention variant (baseline
GQA, +GroupNorm, Differential attention, MEA without GroupNorm, MEA) and of transformers' Llama of the
same shape, measured interleaved in one run."""

from __future__ import annotations

import resource
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..convert.fold import plain_config_fields
from ..machine import machine_header
from ..markdown import markdown_table
from ..models import PAPER_VARIANTS, MEAForCausalLM, make_config
from .timing import in_fresh_process, rotated, synchronize


def llama_of(cfg) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**plain_config_fields(cfg), attn_implementation="sdpa"))


def training_system(preset: str, name: str):
    if name == "transformers-llama":
        return llama_of(make_config(preset, "baseline"))
    return MEAForCausalLM(make_config(preset, name))


def training_systems(preset: str) -> tuple[dict, dict]:
    """Every variant the preset's head counts allow, plus transformers' Llama; and the variants skipped."""
    systems, skipped = {}, {}
    for name in [*PAPER_VARIANTS, "transformers-llama"]:  # variants that differ only in init run alike
        try:
            systems[name] = training_system(preset, name)
        except ValueError as e:  # e.g. Differential attention needs even head counts
            skipped[name] = str(e)
    return systems, skipped


def bench_train(*, preset: str = "small", batch: int = 8, seq: int = 256, steps: int = 5, repeats: int = 3,
                device: str = "cpu", dtype: str = "float32", seed: int = 0, memory: bool = True) -> dict:
    """tokens/s of forward+backward for each system (median over `repeats` interleaved rounds) and the
    peak memory one training step adds on top of the model."""
    torch.manual_seed(seed)
    dev, dt = torch.device(device), getattr(torch, dtype)
    systems, skipped = training_systems(preset)
    systems = {k: m.to(dev).train() for k, m in systems.items()}
    ids = torch.randint(0, systems["baseline"].config.vocab_size, (batch, seq), device=dev)
    autocast = torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32)

    def step(model):
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for model in systems.values():  # warm-up
        step(model)
    rates: dict[str, list[float]] = {k: [] for k in systems}
    names = list(systems)
    for r in range(repeats):
        for name in rotated(names, r):  # who goes first changes each round
            model = systems[name]
            synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model)
            synchronize(dev)
            rates[name].append(batch * seq * steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    peak = {}
    if memory:
        for name in names:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
                step(systems[name])
                peak[name] = torch.cuda.max_memory_allocated(dev) - before
            else:
                peak[name] = in_fresh_process(_step_peak_child, preset, name, batch, seq, dtype)
    return {
        "benchmark": "train_step",
        "machine": machine_header(dev),
        "settings": dict(preset=preset, batch=batch, seq=seq, steps=steps, repeats=repeats, dtype=dtype),
        "tokens_per_s": med,
        "tokens_per_s_all": rates,
        "ratios": {**{f"{k}/baseline": med[k] / med["baseline"] for k in med if k not in ("baseline",
                                                                                       "transformers-llama")},
                   "baseline/transformers-llama": med["baseline"] / med["transformers-llama"]},
        "peak_step_memory_bytes": peak,
        "memory_note": ("CUDA: max_memory_allocated during one step minus memory before it" if dev.type == "cuda" else
                        "CPU: peak resident memory of one training step minus the resident memory before it, "
                        "each system in a fresh process"),
        "skipped": skipped,
    }


def _step_peak_child(preset: str, name: str, batch: int, seq: int, dtype: str) -> int:
    torch.manual_seed(0)
    model = training_system(preset, name).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    dt = getattr(torch, dtype)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize()
    with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def markdown(result: dict) -> str:
    base, peak = result["tokens_per_s"]["baseline"], result["peak_step_memory_bytes"]
    return markdown_table(["system", "tokens/s (median)", "vs baseline", "peak step memory MiB"],
                          [[name, f"{rate:,.0f}", f"{rate / base:.2f}×",
                            f"{peak[name] / 2**20:.0f}" if name in peak else ""]
                           for name, rate in result["tokens_per_s"].items()])
