"""What the learned HLC matrices look like, how far they moved, and whether that tracks head importance.

* matrices: W_lc^K and W_lc^V (h' x h) of every layer, plotted stacked by layer;
* movement: ||W - W_ref||_F / ||W_ref||_F per layer, against a reference model (e.g. the compressed model
  before recovery) or, without one, against the configured initialisation (identity / shared);
* head importance: the held-out loss increase when composite KV head j of a layer is removed (column j of
  W_lc^K and W_lc^V set to zero: its group of query heads then reads nothing);
* relation: Spearman rank correlation of importance with each head's HLC column norm and its movement.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layers import MEAAttention
from ..plotting import pyplot, save_figure
from .perplexity import perplexity


def hlc_layers(model) -> list[MEAAttention]:
    layers = [m for m in model.modules() if isinstance(m, MEAAttention) and m.hlc]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no HLC matrices (an MEA model with mea_hlc=True is needed; "
                         "convert or compress the model first)")
    for a in layers:
        if a.key_mixing != "head" or a.value_mixing != "head" or a.num_key_components != a.num_value_components:
            raise ValueError(f"layer {a.layer_idx} mixes keys by {a.key_mixing!r} and values by {a.value_mixing!r} "
                             "with separate sizes; this analysis reads the paper's h' x h HLC matrices (same h' for "
                             "keys and values): analyse a model compressed with --method whitened or svd")
    return layers


def reference_matrices(model, reference=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if reference is not None:
        ref = hlc_layers(reference)
        if len(ref) != len(hlc_layers(model)):
            raise ValueError("the reference model has a different number of HLC layers")
        return [(a.hlc_k.detach(), a.hlc_v.detach()) for a in ref]
    return [a.initial_mixing(model.config.mea_hlc_init) for a in hlc_layers(model)]


@torch.no_grad()
def head_importance(model, windows: torch.Tensor) -> tuple[float, list[list[float]]]:
    """(base loss, per layer per composite head: loss increase when that head is removed)."""
    base = perplexity(model, windows)["nll"]
    table = []
    for attn in hlc_layers(model):
        row = []
        for j in range(attn.num_kv_heads):
            saved = attn.hlc_k[:, j].clone(), attn.hlc_v[:, j].clone()
            attn.hlc_k[:, j] = 0
            attn.hlc_v[:, j] = 0
            row.append(perplexity(model, windows)["nll"] - base)
            attn.hlc_k[:, j], attn.hlc_v[:, j] = saved
        table.append(row)
    return base, table


def spearman(a, b) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def analyze_hlc(model, windows: torch.Tensor, *, reference=None) -> dict:
    layers = hlc_layers(model)
    refs = reference_matrices(model, reference)
    base, importance = head_importance(model, windows)
    per_layer, col_norm, col_move, flat_importance = [], [], [], []
    for i, (attn, (rk, rv)) in enumerate(zip(layers, refs)):
        k, v = attn.hlc_k.detach().float().cpu(), attn.hlc_v.detach().float().cpu()
        rk, rv = rk.float().cpu(), rv.float().cpu()
        per_layer.append({
            "layer": i, "h_prime": attn.num_component_heads,
            "moved_k": float((k - rk).norm() / rk.norm().clamp_min(1e-12)),
            "moved_v": float((v - rv).norm() / rv.norm().clamp_min(1e-12)),
            "hlc_k": k.tolist(), "hlc_v": v.tolist(), "importance": importance[i],
            "head_norm": [float(torch.cat([k[:, j], v[:, j]]).norm()) for j in range(attn.num_kv_heads)],
            "head_moved": [float(torch.cat([k[:, j] - rk[:, j], v[:, j] - rv[:, j]]).norm())
                           for j in range(attn.num_kv_heads)]})
        col_norm += per_layer[-1]["head_norm"]
        col_move += per_layer[-1]["head_moved"]
        flat_importance += importance[i]
    return {"base_loss": base, "layers": per_layer,
            "reference": "given model" if reference is not None else "configured initialisation",
            "spearman_importance_vs_column_norm": spearman(flat_importance, col_norm),
            "spearman_importance_vs_movement": spearman(flat_importance, col_move),
            "heads": len(flat_importance)}


def plot_hlc(result: dict, path) -> None:
    plt = pyplot()

    layers = result["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(11, max(3.0, 0.22 * sum(l["h_prime"] for l in layers) + 1.5)),
                             gridspec_kw={"width_ratios": [1, 1, 1.4]})
    for ax, key, name in ((axes[0], "hlc_k", "W_lc^K"), (axes[1], "hlc_v", "W_lc^V")):
        stacked = np.concatenate([np.asarray(l[key]) for l in layers])
        lim = np.abs(stacked).max() or 1.0
        im = ax.imshow(stacked, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        row = 0
        for l in layers[:-1]:
            row += l["h_prime"]
            ax.axhline(row - 0.5, color="k", lw=0.4)
        ax.set_title(f"{name} (rows: component heads, stacked by layer)", fontsize=8)
        ax.set_xlabel("composite head")
        fig.colorbar(im, ax=ax, fraction=0.05)
    imp = [x for l in layers for x in l["importance"]]
    moved = [x for l in layers for x in l["head_moved"]]
    axes[2].scatter(moved, imp, s=12)
    axes[2].set_xlabel("movement of the head's HLC columns, ||dW_lc^K[:, j], dW_lc^V[:, j]||")
    axes[2].set_ylabel("loss increase when the head is removed (nats)")
    rho = result["spearman_importance_vs_movement"]
    axes[2].set_title(f"head importance vs movement (Spearman, per head: {rho if rho is None else round(rho, 2)})",
                      fontsize=8)
    axes[2].grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
