"""Report of a learning-rate study: final validation loss per variant and rate (mean +- std over seeds),
divergences, loss curves, and a verdict with a significance figure for each of the paper's claims.

Verdicts: "supported" / "contradicted" need p < 0.05 (Welch's t-test over seeds for losses, Fisher's
exact test for divergence counts); otherwise "not significant". The reference rate for "equal learning
rate" comparisons is the baseline's best rate (the paper used 1e-3, its chosen rate)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import write_json_atomic, write_text_atomic
from ..plotting import pyplot, save_figure
from .lr_layout import VARIANT_ORDER, run_name
from .run_files import read_json, read_jsonl
from .stats import fisher_exact, welch

ALPHA = 0.05


def load_runs(out: Path) -> list[dict]:
    plan = json.loads((out / "study.json").read_text())
    runs = []
    for v in plan["variants"]:
        for lr in plan["lrs"]:
            for s in plan["seeds"]:
                name = run_name(v, lr, s)
                run = out / "runs" / name
                fix = f"delete {run} and rerun the study to redo that run"
                status = read_json(run / "status.json", fix=fix) or {}
                records, cut = read_jsonl(run / "metrics.jsonl", fix=fix)
                vals = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
                train = [(r["tokens"], r["loss_ema"]) for r in records if "loss_ema" in r]
                tok_s = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
                state = status.get("state", "missing")
                if cut and state != "running":
                    raise ValueError(f"{run / 'metrics.jsonl'} ends in a cut line but the run is {state}; {fix}")
                runs.append({"name": name, "variant": v, "lr": lr, "seed": s, "state": state,
                             "final_val_loss": vals[-1][1] if state == "finished" and vals else None,
                             "val_curve": vals, "train_curve": train, "reason": status.get("reason"),
                             "tokens_per_s": float(np.median(tok_s)) if tok_s else None})
    return runs


def summarize(runs: list[dict]) -> dict:
    variants = [v for v in VARIANT_ORDER if any(r["variant"] == v for r in runs)]
    variants += sorted({r["variant"] for r in runs} - set(variants))
    lrs = sorted({r["lr"] for r in runs})
    cells = {}
    for v in variants:
        for lr in lrs:
            rs = [r for r in runs if r["variant"] == v and r["lr"] == lr]
            losses = [r["final_val_loss"] for r in rs if r["final_val_loss"] is not None]
            cells[(v, lr)] = {"losses": losses, "diverged": sum(r["state"] == "diverged" for r in rs), "n": len(rs),
                              "done": sum(r["state"] in ("finished", "diverged") for r in rs),
                              "mean": float(np.mean(losses)) if losses else None,
                              "std": float(np.std(losses, ddof=1)) if len(losses) > 1 else None}
    best = {v: _best_lr(cells, v, lrs) for v in variants}
    stable = {v: max((lr for lr in lrs if cells[(v, lr)]["done"] == cells[(v, lr)]["n"]
                      and cells[(v, lr)]["diverged"] == 0), default=None) for v in variants}
    ref = best.get("baseline")
    return {"variants": variants, "lrs": lrs, "cells": cells, "best_lr": best, "max_stable_lr": stable,
            "reference_lr": ref, "claims": claims(runs, cells, variants, lrs, best, stable, ref)}


def _best_lr(cells, v, lrs):
    ok = [lr for lr in lrs if cells[(v, lr)]["mean"] is not None and cells[(v, lr)]["diverged"] == 0]
    return min(ok, key=lambda lr: cells[(v, lr)]["mean"]) if ok else None


def _verdict(p, better: bool | None) -> str:
    if p is None or better is None:
        return "not enough runs"
    if p >= ALPHA:
        return "not significant"
    return "supported" if better else "contradicted"


def _loss_claim(text, cells, a, b, lr_a, lr_b, *, want_lower=True) -> dict:
    if lr_a is None or lr_b is None:
        return {"claim": text, "evidence": "a variant has no stable rate", "verdict": "not enough runs", "p": None}
    t = welch(cells[(a, lr_a)]["losses"], cells[(b, lr_b)]["losses"])
    if t is None:
        return {"claim": text, "evidence": "fewer than 2 finished seeds", "verdict": "not enough runs", "p": None}
    ev = (f"{a} {_ms(cells[(a, lr_a)])} at {lr_a:g} vs {b} {_ms(cells[(b, lr_b)])} at {lr_b:g}: "
          f"diff {t['diff']:+.4f}")
    return {"claim": text, "evidence": ev, "p": t["p"], "verdict": _verdict(t["p"], (t["diff"] < 0) == want_lower)}


def claims(runs, cells, variants, lrs, best, stable, ref) -> list[dict]:
    out = []
    if "mea" in variants and "baseline" in variants:
        out.append(_stability_claim("MEA trains stably at larger learning rates than the baseline",
                                    cells, lrs, stable, "mea", "baseline"))
        out.append(_loss_claim("MEA reaches a lower validation loss than the baseline at the same learning rate "
                               "(the baseline's best)", cells, "mea", "baseline", ref, ref))
        others = [v for v in variants if v != "mea" and ref is not None and cells[(v, ref)]["mean"] is not None]
        if others and ref is not None and cells[("mea", ref)]["mean"] is not None:
            runner = min(others, key=lambda v: cells[(v, ref)]["mean"])
            c = _loss_claim("MEA reaches the lowest validation loss of all variants at that rate",
                            cells, "mea", runner, ref, ref)
            c["evidence"] += f" (the best other variant is {runner})"
            out.append(c)
        out.append(_loss_claim("MEA at its best rate beats the baseline at its best rate", cells, "mea", "baseline",
                               best.get("mea"), ref))
        out.append(_speed_claim(runs, ref))
    if "mea-no-groupnorm" in variants and "baseline" in variants:
        c = _loss_claim("MEA without GroupNorm is about equal to the baseline", cells, "mea-no-groupnorm",
                        "baseline", ref, ref)
        if c["p"] is not None:  # "about equal" is supported by the absence of a significant difference
            c["verdict"] = "supported (no significant difference)" if c["p"] >= ALPHA else "contradicted"
        out.append(c)
    if "mea-no-groupnorm" in variants and "mea" in variants:
        out.append(_stability_claim("GroupNorm keeps MEA stable (MEA without GroupNorm is less stable)",
                                    cells, lrs, stable, "mea", "mea-no-groupnorm"))
    return out


def _stability_claim(text, cells, lrs, stable, a, b) -> dict:
    """Compare the largest rate without divergence; significance from the divergence counts at the rate
    where the two differ most (Fisher's exact test)."""
    diffs = [(abs(cells[(a, lr)]["diverged"] - cells[(b, lr)]["diverged"]), lr) for lr in lrs]
    gap, lr = max(diffs)
    ca, cb = cells[(a, lr)], cells[(b, lr)]
    p = fisher_exact(ca["diverged"], ca["n"], cb["diverged"], cb["n"])
    sa, sb = stable[a], stable[b]
    ev = (f"largest rate without divergence: {a} {_lr(sa)}, {b} {_lr(sb)}; diverged at {lr:g}: "
          f"{a} {ca['diverged']}/{ca['n']}, {b} {cb['diverged']}/{cb['n']}")
    if sa == sb or gap == 0:
        return {"claim": text, "evidence": ev, "p": p, "verdict": "no difference in this grid"}
    better = (sa or 0) > (sb or 0)
    return {"claim": text, "evidence": ev, "p": p, "verdict": _verdict(p, better)}


def _speed_claim(runs, ref) -> dict:
    """Tokens MEA needs to reach the baseline's final validation loss (mean curves at the reference rate);
    significance: Welch's test on each seed's mean validation loss over the run (area under the curve)."""
    text = "MEA converges faster than the baseline (tokens to reach the baseline's final validation loss)"
    pick = {v: [r for r in runs if r["variant"] == v and r["lr"] == ref and r["state"] == "finished"]
            for v in ("mea", "baseline")}
    if ref is None or any(len(rs) < 2 for rs in pick.values()):
        return {"claim": text, "evidence": "fewer than 2 finished seeds", "verdict": "not enough runs", "p": None}
    curves = {v: _mean_curve([r["val_curve"] for r in rs]) for v, rs in pick.items()}
    target = curves["baseline"][-1][1]
    reach = next((tok for tok, loss in curves["mea"] if loss <= target), None)
    total = curves["baseline"][-1][0]
    auc = {v: [np.mean([x for _, x in r["val_curve"]]) for r in rs] for v, rs in pick.items()}
    t = welch(auc["mea"], auc["baseline"])
    ev = (f"at {ref:g}: MEA reaches {target:.4f} after {reach:,} of {total:,} tokens ({reach / total:.0%})"
          if reach else f"at {ref:g}: MEA does not reach the baseline's final {target:.4f}")
    ev += f"; mean validation loss over the run, diff {t['diff']:+.4f}"
    return {"claim": text, "evidence": ev, "p": t["p"], "verdict": _verdict(t["p"], t["diff"] < 0)}


def _mean_curve(curves):
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], float(np.mean([c[i][1] for c in curves]))) for i in range(n)]


def _ms(cell) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.4f}" + (f" ± {cell['std']:.4f}" if cell["std"] is not None else "") + f" (n={len(cell['losses'])})"


def _lr(x) -> str:
    return "none" if x is None else f"{x:g}"


def write_report(out: str | Path) -> dict:
    out = Path(out)
    runs = load_runs(out)
    s = summarize(runs)
    _plot_sweep(out / "lr_sweep.png", s)
    _plot_curves(out / "curves.png", runs, s)
    md = render_markdown(s, runs)
    write_text_atomic(out / "report.md", md)
    summary = {k: v for k, v in s.items() if k != "cells"}
    summary["table"] = [{"variant": v, "lr": lr, **{k: c[k] for k in ("mean", "std", "diverged", "n", "losses")}}
                        for (v, lr), c in s["cells"].items()]
    summary["tokens_per_s"] = {v: _median([r["tokens_per_s"] for r in runs if r["variant"] == v]) for v in s["variants"]}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def render_markdown(s: dict, runs: list[dict]) -> str:
    lrs, variants = s["lrs"], s["variants"]
    done = sum(r["state"] in ("finished", "diverged") for r in runs)
    lines = [f"Final validation loss (mean ± std over seeds; `div k/n`: k of n seeds diverged). "
             f"{done}/{len(runs)} runs done.", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for v in variants:
        row = []
        for lr in lrs:
            c = s["cells"][(v, lr)]
            txt = "—" if c["mean"] is None else f"{c['mean']:.3f}" + (f" ± {c['std']:.3f}" if c["std"] else "")
            if c["diverged"]:
                txt += f" (div {c['diverged']}/{c['n']})"
            if c["done"] < c["n"]:
                txt += f" [{c['done']}/{c['n']} done]"
            row.append(txt)
        lines.append(f"| {v} | " + " | ".join(row) + f" | {_lr(s['best_lr'][v])} |")
    lines += ["", "| claim (paper) | our evidence | p | verdict |", "|---|---|---|---|"]
    for c in s["claims"]:
        p = "—" if c["p"] is None else f"{c['p']:.3g}"
        lines.append(f"| {c['claim']} | {c['evidence']} | {p} | {c['verdict']} |")
    lines += ["", f"Reference rate (the baseline's best): {_lr(s['reference_lr'])}. p: Welch's t-test over seeds "
              "(losses) or Fisher's exact test (divergence counts); verdicts need p < 0.05.", ""]
    return "\n".join(lines)


def _colors(variants):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {v: cmap(i) for i, v in enumerate(variants)}


def _plot_sweep(path: Path, s: dict) -> None:
    plt = pyplot()

    colors = _colors(s["variants"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    finite = [c["mean"] for c in s["cells"].values() if c["mean"] is not None]
    top = max(finite) + 0.05 if finite else 1.0
    for i, v in enumerate(s["variants"]):
        xs = [lr * (1 + 0.04 * (i - 2)) for lr in s["lrs"]]  # small offsets so error bars do not overlap
        cs = [s["cells"][(v, lr)] for lr in s["lrs"]]
        pts = [(x, c["mean"], c["std"] or 0.0) for x, c in zip(xs, cs) if c["mean"] is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                        capsize=3, color=colors[v], label=v)
        for x, c in zip(xs, cs):
            if c["diverged"]:
                ax.scatter([x], [top], marker="x", color=colors[v], s=40)
                ax.annotate(str(c["diverged"]), (x, top), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=colors[v])
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("Learning-rate sweep (mean ± std over seeds; x = diverged, with count)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


def _plot_curves(path: Path, runs: list[dict], s: dict) -> None:
    plt = pyplot()

    colors = _colors(s["variants"])
    lrs = s["lrs"]
    fig, axes = plt.subplots(1, len(lrs), figsize=(3.2 * len(lrs), 3.4), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for v in s["variants"]:
            for r in (r for r in runs if r["variant"] == v and r["lr"] == lr and r["train_curve"]):
                xs, ys = zip(*r["train_curve"])
                ax.plot(xs, ys, color=colors[v], lw=1, alpha=0.8, ls="-" if r["state"] == "finished" else ":",
                        label=v if r["seed"] == min(x["seed"] for x in runs) else None)
        early = sum(r["state"] == "diverged" and not r["train_curve"] for r in runs if r["lr"] == lr)
        if early:
            ax.text(0.5, 0.5, f"{early} runs diverged\nbefore the first log", transform=ax.transAxes, ha="center",
                    fontsize=8)
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (moving average)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Training loss per rate, every seed (dotted: diverged, stops where detected)", fontsize=9)
    save_figure(fig, path, dpi=110)

