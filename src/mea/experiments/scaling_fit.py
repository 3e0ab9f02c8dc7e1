"""Fits for scaling curves: the paper's L(D) = (D_c / D)^alpha + L_0 by least squares, the trend of a loss
gap in log D, and bootstrap intervals over seeds and points.

A curve is a list of (tokens, loss) pairs; the runs (seeds) of one variant share their token points.
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP = 400  # replicates


def loss_law(tokens, log_dc: float, alpha: float, l0: float):
    """(D_c / D)^alpha + L_0, with D_c given by its logarithm (a well-scaled parameter)."""
    return np.exp(alpha * (log_dc - np.log(tokens))) + l0


def fit_loss_law(tokens, losses, *, start: dict | None = None) -> dict | None:
    """Least-squares L(D) fit: {"D_c", "alpha", "L_0", "rmse"}, or None when it does not converge (or with fewer
    than 4 points). L_0 is kept below the lowest loss and alpha in (0, 5]. Without `start` (an earlier fit)
    several starting points are tried."""
    from scipy.optimize import curve_fit

    d, y = np.asarray(tokens, float), np.asarray(losses, float)
    if d.size < 4 or not np.all(np.isfinite(y)) or np.any(d <= 0):
        return None
    lower, upper = np.array([-50.0, 1e-4, 0.0]), np.array([200.0, 5.0, y.min()])
    starts = [(start["log_D_c"], start["alpha"], start["L_0"])] if start else []
    for alpha0 in ((0.1, 0.3, 1.0) if not start else ()):
        for frac in (0.5, 0.9):
            l0 = y.min() - frac * (y.max() - y.min()) - 1e-3
            excess = max(y.max() - l0, 1e-6)  # the first point's (D_c / D)^alpha
            starts.append((math.log(d.min()) + math.log(excess) / alpha0, alpha0, l0))
    best = None
    for p0 in starts:
        p0 = np.clip(p0, lower + 1e-9, upper - 1e-9)
        try:
            p, _ = curve_fit(loss_law, d, y, p0=p0, bounds=(lower, upper), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        rmse = float(np.sqrt(np.mean((loss_law(d, *p) - y) ** 2)))
        if best is None or rmse < best["rmse"]:
            best = {"D_c": float(math.exp(min(p[0], 700.0))), "log_D_c": float(p[0]), "alpha": float(p[1]),
                    "L_0": float(p[2]), "rmse": rmse}
    return best


def interval(samples) -> list[float] | None:
    """The central CONFIDENCE percentile interval of `samples` (None with fewer than 20 usable)."""
    xs = np.asarray([x for x in samples if x is not None and np.isfinite(x)], float)
    if xs.size < 20:
        return None
    lo = (1 - CONFIDENCE) / 2
    return [float(np.quantile(xs, lo)), float(np.quantile(xs, 1 - lo))]


def mean_curve(curves: list[list]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mean loss) over the points every curve has."""
    common = sorted(set.intersection(*(set(t for t, _ in c) for c in curves)))
    by = [dict(c) for c in curves]
    return np.asarray(common, float), np.asarray([np.mean([b[t] for b in by]) for t in common], float)


def fit_with_intervals(curves: list[list], *, reps: int = BOOTSTRAP, seed: int = 0) -> dict | None:
    """L(D) on the mean of the seeds' curves, with bootstrap intervals: each replicate draws seeds with
    replacement (when there are 2+), averages them, draws the points with replacement, and refits."""
    if not curves:
        return None
    d, y = mean_curve(curves)
    fit = fit_loss_law(d, y)
    if fit is None:
        return None
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(reps):
        pick = [curves[i] for i in rng.integers(0, len(curves), len(curves))] if len(curves) > 1 else curves
        bd, by = mean_curve(pick)
        idx = np.sort(rng.integers(0, bd.size, bd.size))
        boot.append(fit_loss_law(bd[idx], by[idx], start=fit) if np.unique(idx).size >= 4 else None)
    ok = [b for b in boot if b is not None]
    return {**fit, "points": int(d.size), "seeds": len(curves), "replicates": len(ok),
            "alpha_ci": interval([b["alpha"] for b in ok]), "L_0_ci": interval([b["L_0"] for b in ok]),
            "log_D_c_ci": interval([b["log_D_c"] for b in ok])}


def gap_slope(tokens, gaps) -> float:
    """Least-squares slope of a gap against log10(tokens): nats per decade of tokens."""
    x, y = np.log10(np.asarray(tokens, float)), np.asarray(gaps, float)
    return float(np.polyfit(x, y, 1)[0])


def gap_trend(curves_a: list[list], curves_b: list[list], *, reps: int = BOOTSTRAP, seed: int = 0) -> dict | None:
    """How mean(a) - mean(b) changes with tokens: its slope per decade of tokens, with a bootstrap interval
    over the seeds of each side; the same over the last decade alone (`recent`: where the shared points span
    more than one decade, with 3+ points in the last), since a closing gap often slows; the gaps at the first
    and last shared points."""
    if not curves_a or not curves_b:
        return None
    da, ya = mean_curve(curves_a)
    db, yb = mean_curve(curves_b)
    common = np.intersect1d(da, db)
    if common.size < 3:
        return None
    windows = {"all": np.ones(common.size, bool)}
    last_decade = common >= common[-1] / 10
    if common[0] < common[-1] / 10 and last_decade.sum() >= 3:
        windows["recent"] = last_decade

    def gap_of(xa, za, xb, zb):  # mean(a) - mean(b) at the shared token counts
        return za[np.isin(xa, common)] - zb[np.isin(xb, common)]

    def slopes(gap) -> dict:
        return {k: gap_slope(common[w], gap[w]) for k, w in windows.items()}

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(reps):
        pa = [curves_a[i] for i in rng.integers(0, len(curves_a), len(curves_a))]
        pb = [curves_b[i] for i in rng.integers(0, len(curves_b), len(curves_b))]
        draws.append(slopes(gap_of(*mean_curve(pa), *mean_curve(pb))))
    resampled = len(curves_a) > 1 and len(curves_b) > 1
    gap = gap_of(da, ya, db, yb)
    point = slopes(gap)
    ci = {k: interval([d[k] for d in draws]) if resampled else None for k in windows}
    out = {"slope_per_decade": point["all"], "slope_ci": ci["all"],
           "first": {"tokens": int(common[0]), "gap": float(gap[0])},
           "last": {"tokens": int(common[-1]), "gap": float(gap[-1])}, "points": int(common.size)}
    if "recent" in windows:
        out["recent"] = {"from_tokens": int(common[last_decade][0]), "slope_per_decade": point["recent"],
                         "slope_ci": ci["recent"]}
    return out


def size_trend(params: list[float], seeds_a: list[list[float]], seeds_b: list[list[float]], *, reps: int = BOOTSTRAP,
               seed: int = 0) -> dict | None:
    """How mean(a) - mean(b) at one token count changes with model size: its least-squares slope per decade of
    parameters across the sizes (`params`; seeds_a[i] / seeds_b[i]: the seeds' losses at size i), with a
    bootstrap interval drawing each size's seeds with replacement on each side (None with 1 seed a side)."""
    if len(params) < 2:
        return None
    x = np.log10(np.asarray(params, float))

    def slope(a, b):
        return float(np.polyfit(x, [np.mean(u) - np.mean(v) for u, v in zip(a, b)], 1)[0])

    rng = np.random.default_rng(seed)
    draws = [slope([rng.choice(u, len(u)) for u in seeds_a], [rng.choice(v, len(v)) for v in seeds_b])
             for _ in range(reps)]
    resampled = all(len(u) > 1 for u in seeds_a) and all(len(v) > 1 for v in seeds_b)
    return {"slope_per_decade": slope(seeds_a, seeds_b), "slope_ci": interval(draws) if resampled else None}
