"""Which layers get how many virtual heads: explicit ranges, the paper's presets, or a KV budget
allocated from measured per-layer sensitivity."""

from __future__ import annotations

import json
import math
from pathlib import Path

LAYER_PRESETS = ("full", "half", "deep")


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'0-5,10,12-14' -> sorted layer indices (inclusive ranges)."""
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad layer range {part!r} in {spec!r}; use e.g. '0-5,10,12-14'") from None
        if not 0 <= a <= b < num_layers:
            raise ValueError(f"layer range {part!r} is outside 0-{num_layers - 1}")
        layers.update(range(a, b + 1))
    return sorted(layers)


def preset_layers(preset: str, num_layers: int) -> list[int]:
    """full: all; half: the middle half (the paper's 12-35 of 48); deep: all but the first 3."""
    if preset == "full":
        return list(range(num_layers))
    if preset == "half":
        return list(range(num_layers // 4, num_layers - num_layers // 4))
    if preset == "deep":
        return list(range(min(3, num_layers - 1), num_layers))
    raise ValueError(f"unknown layer preset {preset!r}; choose one of {', '.join(LAYER_PRESETS)}")


def uniform_plan(num_layers: int, num_heads: int, virtual_heads: int, layers: list[int]) -> list[int]:
    if not 1 <= virtual_heads <= num_heads:
        raise ValueError(f"--virtual-heads must be in [1, {num_heads}] (h' <= h), got {virtual_heads}")
    return [virtual_heads if i in set(layers) else num_heads for i in range(num_layers)]


def greedy_descent(options: list[list[tuple[int, float]]], target: float) -> list[int]:
    """options[l]: layer l's (cache size, loss increase) choices from its largest size down, the first costing
    nothing. Start every layer at its first choice and repeatedly take the step down with the smallest loss
    increase per unit of size saved until the sizes sum to at most `target`. Returns each layer's choice index."""
    choice = [0] * len(options)

    def rate(l):
        (size, loss), (next_size, next_loss) = options[l][choice[l]], options[l][choice[l] + 1]
        return (next_loss - loss) / (size - next_size), l

    while sum(options[l][c][0] for l, c in enumerate(choice)) > target + 1e-9:
        movable = [l for l in range(len(options)) if choice[l] + 1 < len(options[l])]
        if not movable:
            raise ValueError("the budget is below the smallest size every layer can take")
        choice[min(movable, key=rate)] += 1
    return choice


def budget_plan(sensitivity: dict[int, dict[int, float]], num_layers: int, num_heads: int, budget: float,
                floor: float = 0.0) -> list[int]:
    """Whole heads per layer under `budget` x the original KV bytes (`greedy_descent` from h heads everywhere),
    no layer below `floor` x h heads. sensitivity[layer][h'] = loss increase with that layer alone at h'."""
    if not 0 < budget <= 1:
        raise ValueError(f"--kv-budget must be in (0, 1], got {budget}")
    lowest = max(1, math.ceil(floor * num_heads - 1e-9))
    if budget < lowest / num_heads - 1e-9:
        raise ValueError(f"--kv-budget {budget} is below the minimum {lowest}/h = {lowest / num_heads:.3f} "
                         f"({lowest} head(s) per layer{', from --probe-floor' if lowest > 1 else ''})")
    options = [[(num_heads, 0.0)] + [(m, sensitivity[l][m]) for m in range(num_heads - 1, lowest - 1, -1)]
               for l in range(num_layers)]
    return [options[l][c][0] for l, c in enumerate(greedy_descent(options, budget * num_layers * num_heads))]


def load_sensitivity(path: str | Path, num_layers: int, *, widths: bool = False) -> dict:
    """A probe table for --sensitivity: {"delta_loss": {layer: {level: loss increase}}} and, for a width table
    (`widths`: a value-latent method's, which `mea compress --allocate probe` writes beside its model),
    {"splits": {layer: {width: (h'_K, value size)}}}; otherwise whole heads (`mea probe`)."""
    def bad(why: str) -> ValueError:
        made_by = "`mea compress --allocate probe` of a value-latent method" if widths else "`mea probe`"
        return ValueError(f"{path} is not a probe table this compression can use ({why}); give the probe.json "
                          f"written by {made_by}, or drop --sensitivity to run a probe")

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise bad(str(e)) from None
    unit = data.get("unit", "h'") if isinstance(data, dict) else None
    if unit != ("width" if widths else "h'"):
        raise bad(f"its levels are {unit!r}, the method needs {'cached widths' if widths else 'whole heads'}")
    try:
        table = {"delta_loss": {int(l): {int(m): float(v) for m, v in row.items()}
                                for l, row in data["delta_loss"].items()}}
        if widths:
            table["splits"] = {int(l): {int(w): tuple(int(x) for x in kv) for w, kv in row.items()}
                               for l, row in data["splits"].items()}
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise bad(f"malformed: {e!r}") from None
    if sorted(table["delta_loss"]) != list(range(num_layers)):
        raise bad(f"it covers layers {sorted(table['delta_loss'])}, the model has {num_layers}")
    return table


LATENT_STEP = 8  # value latent widths are multiples of this (vector-friendly)


def _widths(num_heads: int, head_dim: int, value_latent: bool):
    """(unit of the value size, step of a layer's cached width) in floats per token."""
    return (1, LATENT_STEP) if value_latent else (head_dim, head_dim)


def cached_width(fraction: float, num_heads: int, head_dim: int, *, value_latent: bool) -> int:
    """`fraction` of a layer's 2 h D cached floats per token, rounded to a width its splits can take."""
    step = _widths(num_heads, head_dim, value_latent)[1]
    return round(fraction * 2 * num_heads * head_dim / step) * step


def best_split(curve: dict[str, list[float]], width: int, num_heads: int, head_dim: int, *,
               value_latent: bool) -> tuple[int, int] | None:
    """The (h'_K, value size) of a layer caching `width` floats per token whose key and value relative errors
    (`factor_model.error_curves`) sum to the least; None when `width` cannot hold a key component and a value."""
    unit = _widths(num_heads, head_dim, value_latent)[0]
    options = [(k, (width - k * head_dim) // unit) for k in range(1, num_heads + 1)
               if 1 <= (width - k * head_dim) // unit <= num_heads * head_dim // unit]
    return min(options, key=lambda kv: (curve["key"][kv[0]] + curve["value"][kv[1]], kv)) if options else None


def width_plan(curves: list[dict[str, list[float]]], num_heads: int, head_dim: int, budget: float, *,
               value_latent: bool) -> list[tuple[int, int]]:
    """Per layer (h'_K, value size): every layer keeps `budget` of its 2 h D cached floats per token, split
    between whole key components and the values (whole heads, or a latent of width R rounded to LATENT_STEP)
    where the sum of the two relative errors is smallest (`best_split`), so h'_K and h'_V need not be equal.
    curves[l] = {"key": error at h'_K = 0..h, "value": error at h'_V = 0..h or R = 0..h D}
    (`factor_model.error_curves`)."""
    if not 0 < budget <= 1:
        raise ValueError(f"--kv-budget must be in (0, 1], got {budget}")
    width = cached_width(budget, num_heads, head_dim, value_latent=value_latent)
    plan = [best_split(c, width, num_heads, head_dim, value_latent=value_latent) for c in curves]
    if None in plan:
        raise ValueError(f"--kv-budget {budget} leaves {width} floats per token and layer: too few for one key "
                         f"component ({head_dim} floats) and the values; raise the budget")
    return plan


PROBE_FRACTIONS = (0.83, 0.67, 0.5, 0.33, 0.25)  # the per-layer cache shares the width probe may try


def probe_width_splits(curves: list[dict[str, list[float]]], num_heads: int, head_dim: int, budget: float, *,
                       value_latent: bool) -> dict[int, dict[int, tuple[int, int]]]:
    """splits[layer][width] = that layer's `best_split` at each width the probe tries: the budget's own share
    (so the uniform plan is always reachable) and those of PROBE_FRACTIONS at least half of it (narrower layers
    are never chosen at a sensible budget, and each width costs a probe pass per layer), where a key component
    and a value fit. The probe measures each; `width_budget_plan` chooses among them."""
    fractions = {budget, *(f for f in PROBE_FRACTIONS if f >= budget / 2)}
    widths = sorted({cached_width(f, num_heads, head_dim, value_latent=value_latent) for f in fractions}, reverse=True)
    splits = {}
    for layer, curve in enumerate(curves):
        row = {w: best_split(curve, w, num_heads, head_dim, value_latent=value_latent) for w in widths}
        splits[layer] = {w: kv for w, kv in row.items() if kv is not None and w < 2 * num_heads * head_dim}
    return splits


def width_budget_plan(sensitivity: dict[int, dict[int, float]], splits: dict[int, dict[int, tuple[int, int]]],
                      num_heads: int, head_dim: int, budget: float, *, value_latent: bool,
                      floor: float = 0.0) -> list[tuple[int, int]]:
    """Per layer (h'_K, value size) under `budget` x the original KV bytes, layers allowed different widths:
    `greedy_descent` from the uncompressed width everywhere through each layer's probed widths (`splits`) of at
    least `floor` of its cache, sensitivity[layer][width] = loss increase with that layer alone at that width."""
    if not 0 < budget <= 1:
        raise ValueError(f"--kv-budget must be in (0, 1], got {budget}")
    full_width = 2 * num_heads * head_dim
    full = (num_heads, num_heads * head_dim if value_latent else num_heads)
    options = [[(full_width, 0.0)] + [(w, sensitivity[l][w]) for w in sorted(splits[l], reverse=True)
                                      if w >= floor * full_width - 1e-9] for l in range(len(splits))]
    smallest = sum(o[-1][0] for o in options)
    if smallest > budget * len(options) * full_width + 1e-9:
        raise ValueError(f"--kv-budget {budget} is below what the probed widths reach "
                         f"({smallest / (len(options) * full_width):.3f} of the cache); raise the budget"
                         + (" or lower --probe-floor" if floor else ""))
    choice = greedy_descent(options, budget * len(options) * full_width)
    return [full if c == 0 else splits[l][options[l][c][0]] for l, c in enumerate(choice)]
