"""Small-sample statistics for study reports, without SciPy: Welch's t-test and Fisher's exact test."""

from __future__ import annotations

import math

import numpy as np


def t_sf_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom, by integrating its density
    (Simpson's rule on [0, |t|]); accurate to ~1e-8 for the df >= 1 used here."""
    t = abs(t)
    if t == 0:
        return 1.0
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = np.linspace(0.0, t, 20001)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x**2 / df))
    h = x[1] - x[0]
    area = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return float(min(1.0, max(0.0, 1.0 - 2.0 * area)))


def p_text(p: float) -> str:
    """A p-value for a report: two significant digits, or an upper bound below what `t_sf_two_sided` resolves."""
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"


def welch(a: list[float], b: list[float]) -> dict | None:
    """Welch's unequal-variance t-test of mean(a) - mean(b); None with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    va, vb = a_.var(ddof=1) / a_.size, b_.var(ddof=1) / b_.size
    diff = float(a_.mean() - b_.mean())
    if va + vb == 0:
        return {"diff": diff, "t": math.copysign(math.inf, diff) if diff else 0.0, "df": None,
                "p": 0.0 if diff else 1.0}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a_.size - 1) + vb**2 / (b_.size - 1))
    return {"diff": diff, "t": t, "df": float(df), "p": t_sf_two_sided(t, df)}


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test that k1/n1 and k2/n2 (e.g. diverged runs) share one rate."""
    total_k, total = k1 + k2, n1 + n2

    def prob(k: int) -> float:
        return math.comb(n1, k) * math.comb(n2, total_k - k) / math.comb(total, total_k)

    observed = prob(k1)
    lo, hi = max(0, total_k - n2), min(n1, total_k)
    return float(min(1.0, sum(p for k in range(lo, hi + 1) if (p := prob(k)) <= observed * (1 + 1e-9))))


def two_proportions(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two-sided p-value that two accuracies (proportions over n1 and n2 examples) are equal, by the pooled
    two-proportion z-test (unpaired, so conservative when both were scored on the same examples)."""
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var == 0:
        return 1.0 if p1 == p2 else 0.0
    return math.erfc(abs(p1 - p2) / math.sqrt(var) / math.sqrt(2))
