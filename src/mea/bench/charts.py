"""Benchmark plots: one line per system over context length."""

from __future__ import annotations

from ..plotting import pyplot, save_figure


def plot_vs_context(results: list[dict], panels: list[tuple], path, *, columns: int = 2) -> None:
    """panels: (title, value(r), y label, keep(r)) each; a line per system through the kept results,
    context on a log2 axis."""
    plt = pyplot()
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, min(columns, len(panels)), figsize=(5.2 * min(columns, len(panels)), 3.8 * rows),
                             squeeze=False)
    systems = list(dict.fromkeys(r["system"] for r in results))
    for ax, (title, value, ylabel, keep) in zip(axes.flat, panels):
        for name in systems:
            rs = sorted((r for r in results if r["system"] == name and keep(r)), key=lambda r: r["context"])
            if rs:
                ax.plot([r["context"] for r in rs], [value(r) for r in rs], marker="o", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
