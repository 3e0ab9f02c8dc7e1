"""Speed and memory benchmarks (`mea bench ...`); results are JSON with a machine header, plus a
markdown table (and plots) next to the JSON."""

from . import decode, memory, prefill, train_step

BENCHES = {"train": train_step, "prefill": prefill, "decode": decode, "memory": memory}
RUNNERS = {name: getattr(module, f"bench_{name}") for name, module in BENCHES.items()}

__all__ = ["BENCHES", "RUNNERS"]
