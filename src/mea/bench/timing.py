"""Timing helpers of the benchmarks: fair turns, fresh processes, device synchronisation, read bandwidth."""

from __future__ import annotations

import multiprocessing
import time

import torch


def rotated(names: list, round_index: int) -> list:
    """`names` starting at a different one each round, so no system always runs first."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def in_fresh_process(fn, *args):
    """fn(*args) in a new (spawned) process: memory high-water marks there count only fn's work."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device, *, mbytes: int = 512, repeats: int = 10) -> float:
    """Read bandwidth in bytes/s: best time to sum a buffer much larger than the caches."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best
