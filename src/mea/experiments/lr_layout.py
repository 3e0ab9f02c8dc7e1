"""How a learning-rate study names its runs, shared by the study (which runs them) and its report (which
reads them): OUT/runs/<run_name>/, variants listed in VARIANT_ORDER."""

from __future__ import annotations

from ..models.presets import PAPER_VARIANTS

VARIANT_ORDER = list(PAPER_VARIANTS)


def lr_tag(lr: float) -> str:
    """A learning rate in a run's name: the shortest exponent notation that reads back as the same number (1e-03,
    1.5e-01), so that two rates never share a name."""
    return next(t for t in (f"{lr:.{d}e}" for d in range(17)) if float(t) == lr)


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}__lr{lr_tag(lr)}__s{seed}"
