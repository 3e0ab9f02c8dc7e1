"""How a learning-rate study names its runs, shared by the study (which runs them) and its report (which
reads them): OUT/runs/<run_name>/, variants listed in VARIANT_ORDER."""

from __future__ import annotations

from ..models.presets import PAPER_VARIANTS

VARIANT_ORDER = list(PAPER_VARIANTS)


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}__lr{lr:.0e}__s{seed}"
