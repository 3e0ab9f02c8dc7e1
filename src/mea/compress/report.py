"""`mea probe` output: the per-layer sensitivity table as JSON, markdown and a plot."""

from __future__ import annotations

import sys
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..convert import load_source, to_mea
from ..data import calibration_windows, probe_windows
from ..plotting import pyplot, save_figure
from .calibrate import input_moments, key_moments
from .probe import probe_layers


def run_probe(src: str, out: str, *, levels: list[int] | None = None, method: str = "whitened", windows: int = 4,
              window: int = 512) -> dict:
    source = load_source(src)
    model = to_mea(source.model)
    h = model.config.num_key_value_heads
    levels = levels or list(range(1, h))
    if any(not 1 <= m < h for m in levels):
        raise ValueError(f"--levels must be in [1, {h - 1}] (h' < h = {h}), got {levels}")
    moments = keys = None
    if method == "whitened":
        calib = calibration_windows(source.tokenizer, window=512, count=16)
        moments, keys = input_moments(model, calib), key_moments(model, calib)
    result = probe_layers(model, probe_windows(source.tokenizer, window=window, count=windows), moments, keys,
                          levels=levels, method=method, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["source"] = source.description
    out_dir = Path(out)
    write_json_atomic(out_dir / "probe.json", result)
    rows = ["| layer | " + " | ".join(f"Δloss h'={m}" for m in levels) + " |",
            "|---|" + "---|" * len(levels)]
    rows += [f"| {layer} | " + " | ".join(f"{d[m]:+.4f}" for m in levels) + " |"
             for layer, d in result["delta_loss"].items()]
    write_text_atomic(out_dir / "probe.md", f"Base loss {result['base_loss']:.4f} nats/token on "
                      f"{result['tokens']} probe tokens ({method}).\n\n" + "\n".join(rows) + "\n")
    plot_probe(result, out_dir / "probe.png")
    return {"out": str(out_dir), "base_loss": result["base_loss"],
            "most_sensitive": sorted(result["delta_loss"], key=lambda l: -result["delta_loss"][l][levels[0]])[:5],
            "least_sensitive": sorted(result["delta_loss"], key=lambda l: result["delta_loss"][l][levels[0]])[:5]}


def plot_probe(result: dict, path: Path) -> None:
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
