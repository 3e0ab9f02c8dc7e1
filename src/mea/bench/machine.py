"""What a benchmark ran on: recorded in every JSON result."""

from __future__ import annotations

import multiprocessing
import os
import platform
import subprocess
import time

import torch
import transformers

from ..precision import cpu_capability


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_header(device: torch.device) -> dict:
    header = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "device": str(device),
        **cpu_capability(),  # torch's vector capability and native bf16: what decides `--precision auto`
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    return header


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
