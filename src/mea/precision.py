"""Device and precision chosen at run time from what the hardware has and computes natively.

`--device` (every command that loads a model): CUDA when a GPU is visible, else the CPU (`resolve_device`).
`--dtype` (the weights of a loaded model) and `--precision` (training autocast) take the same values.

bfloat16 autocast pays only where the hardware has bf16 arithmetic: CUDA GPUs, and CPUs with AVX512_BF16 or
AMX (x86) or the BF16 extension (Arm). Elsewhere torch emulates it, which is far slower than float32 (a
forward+backward of the compressed SmolLM2 at 1024 tokens on an AVX2-only CPU: 231 s under bf16 autocast,
9.4 s in float32). `auto_dtype` is the one place that decides; `describe` is what every result records.
"""

from __future__ import annotations

from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_DTYPE = "auto"  # the weights of a loaded model: bf16 on GPUs and CPUs that compute it natively, else fp32
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512_BF16 / AMX-BF16; Arm FEAT_BF16 ("bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where it is unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_capability() -> dict:
    """torch's vector capability (e.g. AVX2, AVX512) and whether the CPU has native bf16 arithmetic."""
    flags = cpu_flags()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_flags": sorted(f for f in BF16_CPU_FLAGS if f in flags),
            "cpu_native_bf16": any(f in flags for f in BF16_CPU_FLAGS)}


def auto_dtype(device: torch.device | str, capability: dict | None = None) -> torch.dtype:
    """bfloat16 on CUDA with bf16 support and on CPUs with native bf16; float32 everywhere else."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = (capability or cpu_capability())["cpu_native_bf16"]
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def resolve(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype for a `--precision` or `--dtype` value: auto (decided from the hardware), fp32 or bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision / dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return auto_dtype(device) if precision == "auto" else DTYPES[precision]


def default_device() -> str:
    """The device of every command that loads a model, unless --device says otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None = None) -> torch.device:
    """A `--device` value (None: `default_device`) as a torch device that exists on this machine."""
    try:
        dev = torch.device(device or default_device())
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps): {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA device is visible to torch; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def placement(device: str | None = None, dtype: str = DEFAULT_DTYPE) -> tuple[torch.device, torch.dtype]:
    """(device, weight dtype) of a command that loads a model: `--device` and `--dtype` resolved together."""
    dev = resolve_device(device)
    return dev, resolve(dtype, dev)


def name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def describe(device: torch.device | str, dtype: torch.dtype) -> dict:
    """What a result records: the CPU capability and the precision the run computed in."""
    return {**cpu_capability(), "precision": name(dtype), "device": str(device)}
