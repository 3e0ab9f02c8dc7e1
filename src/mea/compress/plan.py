"""Which layers get how many virtual heads: explicit ranges, the paper's presets, or a KV budget
allocated from measured per-layer sensitivity."""

from __future__ import annotations

import json
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


def budget_plan(sensitivity: dict[int, dict[int, float]], num_layers: int, num_heads: int, budget: float) -> list[int]:
    """Greedy allocation: start from h heads everywhere and repeatedly take the cheapest step down
    (smallest loss increase per head saved, from the per-layer probe) until the KV bytes fit
    `budget` x the original. sensitivity[layer][h'] = loss increase with that layer alone at h'."""
    if not 0 < budget <= 1:
        raise ValueError(f"--kv-budget must be in (0, 1], got {budget}")
    if budget < 1 / num_heads - 1e-9:
        raise ValueError(f"--kv-budget {budget} is below the minimum 1/h = {1 / num_heads:.3f} (one head per layer)")
    plan = [num_heads] * num_layers
    target = budget * num_layers * num_heads + 1e-9

    def cost(layer, heads):
        return 0.0 if heads == num_heads else sensitivity[layer][heads]

    while sum(plan) > target:
        best = min((l for l in range(num_layers) if plan[l] > 1),
                   key=lambda l: (cost(l, plan[l] - 1) - cost(l, plan[l]), l))
        plan[best] -= 1
    return plan


def load_sensitivity(path: str | Path) -> dict[int, dict[int, float]]:
    data = json.loads(Path(path).read_text())
    try:
        return {int(l): {int(m): float(v) for m, v in row.items()} for l, row in data["delta_loss"].items()}
    except (KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{path} is not a probe result (written by `mea probe`): {e}") from e


LATENT_STEP = 8  # value latent widths are multiples of this (vector-friendly)


def width_plan(curves: list[dict[str, list[float]]], num_heads: int, head_dim: int, budget: float, *,
               value_latent: bool) -> list[tuple[int, int]]:
    """Per layer (h'_K, value size): every layer keeps `budget` of its 2 h D cached floats per token, split
    between whole key components and the values (whole heads, or a latent of width R rounded to LATENT_STEP)
    where the sum of the two relative errors is smallest, so h'_K and h'_V need not be equal.
    curves[l] = {"key": error at h'_K = 0..h, "value": error at h'_V = 0..h or R = 0..h D}
    (`factor_model.error_curves`)."""
    if not 0 < budget <= 1:
        raise ValueError(f"--kv-budget must be in (0, 1], got {budget}")
    unit, step = (1, LATENT_STEP) if value_latent else (head_dim, head_dim)
    width = round(budget * 2 * num_heads * head_dim / step) * step
    options = [(k, (width - k * head_dim) // unit) for k in range(1, num_heads + 1)
               if 1 <= (width - k * head_dim) // unit <= num_heads * head_dim // unit]
    if not options:
        raise ValueError(f"--kv-budget {budget} leaves {width} floats per token and layer: too few for one key "
                         f"component ({head_dim} floats) and the values; raise the budget")
    return [min(options, key=lambda kv: (c["key"][kv[0]] + c["value"][kv[1]], kv)) for c in curves]
