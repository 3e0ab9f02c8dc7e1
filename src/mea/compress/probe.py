"""The paper's layer-sensitivity probe: compress one layer at a time and measure the loss."""

from __future__ import annotations

import torch

from ..eval import perplexity
from .factor_model import factor_attention


def probe_layers(model, windows: torch.Tensor, moments, key_moments=None, *, levels: list[int],
                 method: str = "whitened", log=print) -> dict:
    """delta_loss[layer][h'] = validation loss with only that layer at h' virtual heads, minus the
    uncompressed loss (nats per token). moments / key_moments: from `calibrate` (see `factor_model`)."""
    cfg = model.config
    base = perplexity(model, windows)["nll"]
    delta: dict[int, dict[int, float]] = {}
    for layer in range(cfg.num_hidden_layers):
        delta[layer] = {}
        block = model.model.layers[layer]
        original = block.self_attn
        try:
            for m in levels:  # swap in the compressed attention of this one layer, measure, restore
                block.self_attn, _ = factor_attention(original, m, method=method,
                                                      sigma=moments[layer] if moments is not None else None,
                                                      key_stats=key_moments[layer] if key_moments else None)
                delta[layer][m] = perplexity(model, windows)["nll"] - base
        finally:
            block.self_attn = original
        log(f"layer {layer:2d}: " + ", ".join(f"h'={m}: +{delta[layer][m]:.4f}" for m in levels))
    return {"base_loss": base, "levels": levels, "method": method, "tokens": windows[:, 1:].numel(),
            "delta_loss": delta}


def probe_markdown(result: dict) -> str:
    levels = result["levels"]
    rows = ["| layer | " + " | ".join(f"Δloss h'={m}" for m in levels) + " |", "|---|" + "---|" * len(levels)]
    rows += [f"| {layer} | " + " | ".join(f"{d[m]:+.4f}" for m in levels) + " |"
             for layer, d in result["delta_loss"].items()]
    return (f"Base loss {result['base_loss']:.4f} nats/token on {result['tokens']} probe tokens "
            f"({result['method']}).\n\n" + "\n".join(rows) + "\n")


def plot_probe(result: dict, path) -> None:
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = sorted(result["delta_loss"], key=int)
    for m in result["levels"]:
        ax.plot([int(l) for l in layers], [result["delta_loss"][l][m] for l in layers], marker="o", label=f"h'={m}")
    ax.set_xlabel("layer compressed (alone)")
    ax.set_ylabel("Δ validation loss (nats/token)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    ax.set_title("Layer sensitivity to virtual-head compression")
    save_figure(fig, path)
