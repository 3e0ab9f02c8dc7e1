"""How a scaling study names its runs, shared by the study (which runs them) and its report (which reads
them): OUT/runs/<run_name>/."""

from __future__ import annotations


def run_name(size: str, variant: str, seed: int) -> str:
    return f"{size}__{variant}__s{seed}"


def study_variants(lrs: dict) -> list[str]:
    """The variants of a plan's rate table: its VARIANT keys (SIZE:VARIANT keys are per-size rates)."""
    return [k for k in lrs if ":" not in k]


def rate_of(lrs: dict, size: str, variant: str) -> float:
    """The peak learning rate of `variant` at model `size`: a SIZE:VARIANT entry, else the VARIANT one."""
    return lrs.get(f"{size}:{variant}", lrs[variant])
