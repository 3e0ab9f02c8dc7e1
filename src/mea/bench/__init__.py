"""Speed and memory benchmarks (`mea bench ...`); results are JSON with a machine header, plus a
markdown table (and plots) next to the JSON."""

from . import decode, memory, prefill, train_step

BENCHES = {"train": train_step, "prefill": prefill, "decode": decode, "memory": memory}
RUNNERS = {"train": train_step.bench_train, "prefill": prefill.bench_prefill, "decode": decode.bench_decode,
           "memory": memory.bench_memory}

__all__ = ["BENCHES", "RUNNERS"]
