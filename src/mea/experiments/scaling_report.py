"""Report of a scaling study (scaling_study.py): validation loss against tokens per variant and size, the
paper's L(D) fit with bootstrap intervals, and the gap of each variant to the baseline against tokens and
model size, with Welch's t-test over seeds and a plain verdict. Works on a study in progress: every
comparison uses the token counts that all the runs involved have reached. Each report also writes the runs'
curves (runs.json), so a folder published without the runs' checkpoints re-reports alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import write_json_atomic, write_text_atomic
from ..plotting import pyplot, save_figure
from .run_files import read_json, read_jsonl
from .scaling_fit import fit_with_intervals, gap_trend, mean_curve, size_trend
from .scaling_layout import rate_of, run_name, study_variants
from .stats import p_text, welch

ALPHA = 0.05
REFERENCE = "baseline"
RUNS_FILE = "runs.json"  # each run's state and validation curve, written with every report
FIT_FROM_WARMUPS = 2  # the L(D) fit and the gap trends use the points from 2 x the warm-up tokens on


def parameter_count(preset: str) -> int:
    import torch

    from ..models import MEAForCausalLM, make_config

    with torch.device("meta"):
        return sum(p.numel() for p in MEAForCausalLM(make_config(preset, "baseline")).parameters())


def load_runs(out: Path) -> tuple[dict, list[dict]]:
    """The plan and every run's state and validation curve: from OUT/runs/ while the study has it, else from the
    OUT/runs.json its last report wrote (a published folder, copied without the checkpoints, re-reports)."""
    plan = json.loads((out / "study.json").read_text())
    if not (out / "runs").is_dir():
        saved = read_json(out / RUNS_FILE, fix="copy it from the study's folder, or rerun the study")
        if saved is None:
            raise ValueError(f"{out} has neither runs/ nor {RUNS_FILE}: run `mea study scaling {out}` first, or "
                             f"copy {RUNS_FILE} from the study's folder")
        return plan, saved["runs"]
    tps = plan["train"]["seq_len"] * plan["train"]["batch_size"]
    runs = []
    for size, budget in plan["sizes"].items():
        for v in study_variants(plan["lrs"]):
            for s in plan["seeds"]:
                run = out / "runs" / run_name(size, v, s)
                fix = f"delete {run} and rerun the study to redo that run"
                status = read_json(run / "status.json", fix=fix) or {}
                info = read_json(run / "run.json", fix=fix) or {}
                records, _ = read_jsonl(run / "metrics.jsonl", fix=fix)
                train_tokens = info.get("data", {}).get("train_tokens")
                # a running run's status still shows where it started: its metrics show how far it is
                step = max([status.get("step", 0)] + [r["step"] for r in records if "step" in r])
                runs.append({"size": size, "variant": v, "seed": s, "state": status.get("state", "missing"),
                             "reason": status.get("reason"), "budget": budget, "tokens": step * tps,
                             "train_tokens": train_tokens,
                             "epochs": step * tps / train_tokens if train_tokens else None,
                             "val_curve": [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r],
                             "tokens_per_s": _median([r["tokens_per_s"] for r in records if "tokens_per_s" in r])})
    return plan, runs


def _median(xs):
    return float(np.median(xs)) if xs else None


def summarize(plan: dict, runs: list[dict]) -> dict:
    warm_tokens = FIT_FROM_WARMUPS * plan["train"]["warmup_steps"] * plan["train"]["seq_len"] * plan["train"]["batch_size"]
    sizes, variants = list(plan["sizes"]), study_variants(plan["lrs"])

    def curves(size, v, start=warm_tokens):  # the seeds' validation curves from `start`; diverged runs left out
        cs = [[(t, x) for t, x in r["val_curve"] if t >= start] for r in runs
              if r["size"] == size and r["variant"] == v and r["state"] != "diverged"]
        return [c for c in cs if c]

    cells, gaps = [], []
    for size in sizes:
        for v in variants:
            rs = [r for r in runs if r["size"] == size and r["variant"] == v]
            cs, whole = curves(size, v), curves(size, v, 0)
            at = _shared_last(whole)
            fit = fit_with_intervals(cs) if cs and len(mean_curve(cs)[0]) >= 4 else None
            cells.append({"size": size, "variant": v, "lr": rate_of(plan["lrs"], size, v), "seeds": len(rs),
                          "diverged": sum(r["state"] == "diverged" for r in rs),
                          "done": sum(r["state"] in ("finished", "diverged") for r in rs),
                          "tokens": max(r["tokens"] for r in rs), "budget": plan["sizes"][size],
                          "started": sum(r["tokens"] > 0 for r in rs),
                          "epochs": max((r["epochs"] for r in rs if r["epochs"] is not None), default=None),
                          "train_tokens": next((r["train_tokens"] for r in rs if r["train_tokens"]), None),
                          "tokens_per_s": _median([r["tokens_per_s"] for r in rs if r["tokens_per_s"]]),
                          "at_tokens": at, "loss_at": [dict(c)[at] for c in whole] if at else [], "fit": fit})
        for v in variants:
            if v != REFERENCE:
                gaps.append(_gap(size, v, curves(size, v), curves(size, REFERENCE)))
    params = {s: parameter_count(s) for s in sizes}
    by_size = [_gap_by_size(v, [g for g in gaps if g["variant"] == v], params) for v in variants if v != REFERENCE]
    summary = {"sizes": sizes, "variants": variants, "params": params, "lrs": plan["lrs"], "seeds": plan["seeds"],
               "fit_from_tokens": warm_tokens, "cells": cells, "gaps": gaps, "gap_by_size": by_size,
               "runs_done": sum(r["state"] in ("finished", "diverged") for r in runs), "runs": len(runs),
               "tokens_trained": sum(r["tokens"] for r in runs)}
    summary["verdicts"] = verdicts(summary)
    return summary


def _shared_last(cs: list[list]) -> int | None:
    """The largest token count every curve has."""
    if not cs:
        return None
    common = set.intersection(*(set(t for t, _ in c) for c in cs))
    return max(common) if common else None


def _gap(size: str, v: str, ca: list[list], cb: list[list]) -> dict:
    """`v` - baseline at every shared point (Welch over seeds) and its trend in log tokens."""
    points = []
    if ca and cb:
        common = sorted(set.intersection(*(set(t for t, _ in c) for c in ca + cb)))
        for t in common:
            a, b = [dict(c)[t] for c in ca], [dict(c)[t] for c in cb]
            w = welch(a, b)
            points.append({"tokens": t, "gap": float(np.mean(a) - np.mean(b)), "p": w["p"] if w else None,
                           "seeds": a, "baseline_seeds": b})
    return {"size": size, "variant": v, "points": points, "trend": gap_trend(ca, cb) if ca and cb else None}


def _gap_by_size(v: str, gaps: list[dict], params: dict) -> dict:
    """The gap at the largest token count every size with a gap has reached (sizes not started yet wait), per
    size, and its slope in log10(params) with a bootstrap interval over the seeds (`size_trend`)."""
    gaps = [g for g in gaps if g["points"]]
    shared = set.intersection(*(set(p["tokens"] for p in g["points"]) for g in gaps)) if gaps else set()
    if not shared:
        return {"variant": v, "tokens": None, "rows": [], "slope_per_decade": None, "slope_ci": None}
    t = max(shared)
    rows = [{"size": g["size"], "params": params[g["size"]], **next(p for p in g["points"] if p["tokens"] == t)}
            for g in gaps]
    trend = size_trend([r["params"] for r in rows], [r["seeds"] for r in rows], [r["baseline_seeds"] for r in rows])
    return {"variant": v, "tokens": t, "rows": rows, "slope_per_decade": trend and trend["slope_per_decade"],
            "slope_ci": trend and trend["slope_ci"]}


def trend_sentence(g: dict) -> str:
    """Whether a gap shrinks, holds or grows with tokens, and how fast (a plain sentence). A variant ahead of the
    baseline (negative gap) is said to hold a lead, so a shrinking lead does not read as a closing deficit."""
    tr = g["trend"]
    if tr is None:
        return f"{g['variant']} - baseline at {g['size']}: not enough shared points yet."
    s, ci = tr["slope_per_decade"], tr["slope_ci"]
    behind, was_behind = tr["last"]["gap"] > 0, tr["first"]["gap"] > 0
    span = (f"from {tr['first']['gap']:+.3f} nats at {_tok(tr['first']['tokens'])} tokens to "
            f"{tr['last']['gap']:+.3f} at {_tok(tr['last']['tokens'])}")
    rate = f"{s:+.3f} nats per tenfold tokens" + (f" (95% CI {ci[0]:+.3f} to {ci[1]:+.3f})" if ci else
                                                   " (one seed a side: no interval)")
    what, turned = "the gap", ""
    if ci is None:
        word = "has no tested trend yet"
    elif ci[0] <= 0 <= ci[1]:
        word = "holds (no significant trend)"
    else:  # a significant trend: said of the deficit, or of the lead when the variant is ahead
        word = "shrinks" if (s < 0) == behind else "grows"  # shrinks: moving toward zero
        what = what if behind else "its lead"
        turned = "" if behind == was_behind else (" (it was ahead at first)" if behind else " (it was behind at first)")
    out = f"{g['variant']} - baseline at {g['size']}: {what} {word}{turned}, {span}; {rate}"
    recent = tr.get("recent")  # the latest rate: the last tenfold's where it is measured, else the whole trend's
    now, now_ci = (recent["slope_per_decade"], recent["slope_ci"]) if recent else (s, ci)
    if recent:
        out += (f", {now:+.3f} over the last tenfold (from {_tok(recent['from_tokens'])} tokens" +
                (f", 95% CI {now_ci[0]:+.3f} to {now_ci[1]:+.3f})" if now_ci else ")"))
    if word == "shrinks":  # the closing date at the latest rate
        if now != 0 and (now < 0) == behind and (now_ci is None or not now_ci[0] <= 0 <= now_ci[1]):
            decades = abs(tr["last"]["gap"] / now)
            out += (f"; at {'the last tenfold' if recent else 'that'} rate it would {'close' if behind else 'vanish'} "
                    f"near {_tok(tr['last']['tokens'] * 10 ** decades)} tokens")
        else:
            out += "; over the last tenfold it no longer shrinks significantly"
    return out + "."


def verdicts(summary: dict) -> list[str]:
    out = [trend_sentence(g) for g in summary["gaps"]]
    for b in summary["gap_by_size"]:
        if b["rows"] and len(b["rows"]) >= 2:
            rows = ", ".join(f"{r['size']} {r['gap']:+.3f}" + (f" (p {p_text(r['p'])})" if r["p"] is not None else "")
                             for r in b["rows"])
            ci = b.get("slope_ci")
            out.append(f"{b['variant']} - baseline across sizes at {_tok(b['tokens'])} tokens: {rows}; "
                       f"{b['slope_per_decade']:+.3f} nats per tenfold parameters"
                       + (f" (95% CI {ci[0]:+.3f} to {ci[1]:+.3f}, over seeds)." if ci else " (one seed a side: no "
                          "interval)."))
    return out


def _tok(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _ci(ci, fmt="{:.3f}") -> str:
    return "—" if ci is None else "[" + fmt.format(ci[0]) + ", " + fmt.format(ci[1]) + "]"


def render_markdown(plan: dict, summary: dict) -> str:
    cells = summary["cells"]
    tps = plan["train"]["seq_len"] * plan["train"]["batch_size"]
    unique = next((c["train_tokens"] for c in cells if c["train_tokens"]), None)
    lines = [
        f"{summary['runs_done']}/{summary['runs']} runs at their full budget; {_tok(summary['tokens_trained'])} "
        f"tokens trained in all. Data: {', '.join(plan['data'])} ({_tok(unique) if unique else '?'} unique "
        f"training tokens); {tps} tokens a step; learning rate constant after {plan['train']['warmup_steps']} "
        f"warm-up steps; validation loss at {plan['eval_points']} log-spaced token counts "
        f"on {plan['train']['eval_windows']} fixed windows of {plan['train']['seq_len']} tokens. Fits and gap "
        f"trends use the points from {_tok(summary['fit_from_tokens'])} tokens on (twice the warm-up).", "",
        "## Verdict", "", *[f"- {v}" for v in summary["verdicts"]], "",
        "## Loss and the L(D) fit", "",
        "L(D) = (D_c / D)^alpha + L_0 fitted to the mean of the seeds' validation curves; 95% bootstrap intervals "
        "(seeds and points resampled). `loss`: mean ± std over seeds at the largest token count all seeds reached.", "",
        "| size | params | variant | lr | tokens, most of any seed (epochs) | tok/s | loss | alpha [95% CI] | L_0 [95% CI] | D_c | rmse |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        f = c["fit"]
        loss = "—"
        if c["loss_at"]:
            loss = f"{np.mean(c['loss_at']):.3f}" + (f" ± {np.std(c['loss_at'], ddof=1):.3f}" if len(c["loss_at"]) > 1
                                                     else "") + f" at {_tok(c['at_tokens'])}"
        done = f"{_tok(c['tokens'])}/{_tok(c['budget'])}" + (f" ({c['epochs']:.1f})" if c["epochs"] is not None else "")
        if c["started"] < c["seeds"]:
            done += f", {c['started']}/{c['seeds']} seeds started"
        if c["diverged"]:
            done += f", {c['diverged']}/{c['seeds']} diverged"
        fit = ("| — | — | — | —" if f is None else
               f"| {f['alpha']:.3f} {_ci(f['alpha_ci'])} | {f['L_0']:.3f} {_ci(f['L_0_ci'])} | {f['D_c']:.3g} | "
               f"{f['rmse']:.4f}")
        tok_s = f"{c['tokens_per_s']:,.0f}" if c["tokens_per_s"] else "—"
        lines.append(f"| {c['size']} | {_tok(summary['params'][c['size']])} | {c['variant']} | {c['lr']:g} | {done} | "
                     f"{tok_s} | {loss} {fit} |")
    lines += ["", "## Gap to the baseline against tokens", "",
              "Mean validation loss of the variant minus the baseline's (nats; p: Welch's t-test over seeds).", ""]
    for size in summary["sizes"]:
        gs = [g for g in summary["gaps"] if g["size"] == size and g["points"]]
        if not gs:
            continue
        pts = _spaced([p["tokens"] for p in gs[0]["points"]], 8)
        lines += [f"**{size}**", "", "| variant | " + " | ".join(_tok(t) for t in pts) + " | trend per tenfold tokens |"
                  " last tenfold |", "|---|" + "---|" * (len(pts) + 2)]
        for g in gs:
            by = {p["tokens"]: p for p in g["points"]}
            row = [f"{by[t]['gap']:+.3f}" + (f" (p {p_text(by[t]['p'])})" if by.get(t, {}).get("p") is not None else "")
                   if t in by else "—" for t in pts]
            tr = g["trend"]
            trend, recent = ("—" if x is None else f"{x['slope_per_decade']:+.3f} {_ci(x['slope_ci'], '{:+.3f}')}"
                             for x in (tr, tr and tr.get("recent")))
            lines.append(f"| {g['variant']} | " + " | ".join(row) + f" | {trend} | {recent} |")
        lines.append("")
    lines += ["## Gap to the baseline against model size", ""]
    for b in summary["gap_by_size"]:
        if not b["rows"]:
            continue
        lines.append(f"- {b['variant']} at {_tok(b['tokens'])} tokens: " + ", ".join(
            f"{r['size']} ({_tok(r['params'])} params) {r['gap']:+.3f}" + (f" (p {p_text(r['p'])})" if r["p"] is not None
                                                                           else "") for r in b["rows"])
            + (f"; slope {b['slope_per_decade']:+.3f} nats per tenfold parameters "
               f"{_ci(b.get('slope_ci'), '{:+.3f}')}" if b["slope_per_decade"] is not None else ""))
    lines += ["", "![loss against tokens](loss_vs_tokens.png)", "", "![gap against tokens](gap_vs_tokens.png)", ""]
    return "\n".join(lines)


def _spaced(xs: list, n: int) -> list:
    if len(xs) <= n:
        return xs
    return [xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)]


def _plot_loss(path: Path, plan: dict, runs: list[dict], summary: dict) -> None:
    plt = pyplot()
    from .scaling_fit import loss_law

    sizes, variants = summary["sizes"], summary["variants"]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        for i, v in enumerate(variants):
            for r in (r for r in runs if r["size"] == size and r["variant"] == v and r["val_curve"]):
                xs, ys = zip(*r["val_curve"])
                ax.plot(xs, ys, color=cmap(i), lw=1, alpha=0.7, ls=":" if r["state"] == "diverged" else "-",
                        marker=".", ms=3, label=v if r["seed"] == summary["seeds"][0] else None)
            fit = next(c["fit"] for c in summary["cells"] if c["size"] == size and c["variant"] == v)
            if fit:
                d = np.geomspace(summary["fit_from_tokens"], plan["sizes"][size], 60)
                ax.plot(d, loss_law(d, fit["log_D_c"], fit["alpha"], fit["L_0"]), color=cmap(i), lw=1, ls="--")
        ax.axvline(summary["fit_from_tokens"], color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"{size} ({_tok(summary['params'][size])} parameters)", fontsize=9)
        ax.set_xlabel("training tokens D")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss (nats)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Validation loss per seed (solid) and the L(D) fit on the seeds' mean (dashed)", fontsize=9)
    save_figure(fig, path, dpi=110)


def _plot_gap(path: Path, summary: dict) -> None:
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    others = [v for v in summary["variants"] if v != REFERENCE]
    fig, axes = plt.subplots(1, len(others), figsize=(4.2 * max(1, len(others)), 3.4), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], others):
        for i, size in enumerate(summary["sizes"]):
            g = next(g for g in summary["gaps"] if g["size"] == size and g["variant"] == v)
            if g["points"]:
                ax.plot([p["tokens"] for p in g["points"]], [p["gap"] for p in g["points"]], marker="o", ms=3,
                        color=cmap(i), label=f"{size} ({_tok(summary['params'][size])})")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{v} - baseline", fontsize=9)
        ax.set_xlabel("training tokens D")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss gap (nats)")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def write_report(out: str | Path) -> dict:
    out = Path(out)
    plan, runs = load_runs(out)
    summary = summarize(plan, runs)
    _plot_loss(out / "loss_vs_tokens.png", plan, runs, summary)
    _plot_gap(out / "gap_vs_tokens.png", summary)
    write_text_atomic(out / "report.md", "# Scaling study\n\n" + render_markdown(plan, summary))
    write_json_atomic(out / "summary.json", {**summary, "plan": plan})
    write_json_atomic(out / RUNS_FILE, {"runs": runs})
    return summary


def is_scaling_study(out: Path) -> bool:
    plan = read_json(out / "study.json", fix="delete it and rerun the study")
    return plan is not None and "sizes" in plan

