"""Training-step throughput (forward + backward) of MEA, our baseline GQA, and transformers' Llama of
the same shape, measured interleaved in one run."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..convert.fold import plain_config_fields
from ..models import MEAForCausalLM, make_config
from .machine import machine_header, synchronize


def llama_of(cfg) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**plain_config_fields(cfg), attn_implementation="sdpa"))


def bench_train(*, preset: str = "small", batch: int = 8, seq: int = 256, steps: int = 5, repeats: int = 3,
                device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict:
    """tokens/s of forward+backward for each system; median over `repeats` interleaved rounds."""
    torch.manual_seed(seed)
    dev, dt = torch.device(device), getattr(torch, dtype)
    systems = {
        "mea": MEAForCausalLM(make_config(preset, "mea")),
        "baseline": MEAForCausalLM(make_config(preset, "baseline")),
        "transformers-llama": llama_of(make_config(preset, "baseline")),
    }
    systems = {k: m.to(dev).train() for k, m in systems.items()}
    ids = torch.randint(0, systems["mea"].config.vocab_size, (batch, seq), device=dev)
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
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first each round
            model = systems[name]
            synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model)
            synchronize(dev)
            rates[name].append(batch * seq * steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "benchmark": "train_step",
        "machine": machine_header(dev),
        "settings": dict(preset=preset, batch=batch, seq=seq, steps=steps, repeats=repeats, dtype=dtype),
        "tokens_per_s": med,
        "tokens_per_s_all": rates,
        "ratios": {
            "mea/baseline": med["mea"] / med["baseline"],
            "baseline/transformers-llama": med["baseline"] / med["transformers-llama"],
        },
    }
