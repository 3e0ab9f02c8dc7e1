"""How a scaling study names its runs, shared by the study (which runs them) and its report (which reads
them): OUT/runs/<run_name>/."""

from __future__ import annotations


def run_name(size: str, variant: str, seed: int) -> str:
    return f"{size}__{variant}__s{seed}"
