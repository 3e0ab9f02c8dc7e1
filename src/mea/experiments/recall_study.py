"""Why GroupNorm breaks associative recall: MQAR (mea.eval.mqar) for the baseline, MEA, and MEA with each
variation of its per-head norm (MEAConfig.mea_head_*), per seed, at the recall setting's learning rate and at
a high one (the paper's claim for GroupNorm is stability at high learning rates).

Hypothesis: the norm removes each head's output magnitude, which a recall circuit uses (a head that found no
match should be quiet). The variations give part of it back: a learnable gain per head (a static magnitude
per head), no per-feature weight (does the shared weight matter), and a learned blend from the raw output
to the normalised one (a_i from 0: the norm's strength is learned; a_i -> 0 keeps the magnitude), and a
warm-up of the norm's strength (the same blend, not learned, raised linearly from 0 to 1 over the first half
of training: the model ends as MEA; does the norm block recall only while the circuit forms?). Then the norm's
scale apart from its normalisation: a large eps (the norm nearly linear, at a scale set by eps) and a small
initial weight (full normalisation at the raw output's scale).

    OUT/study.json          the plan (a rerun must ask for the same one)
    OUT/runs/NAME.json      one MQAR run each, written when it ends (a rerun skips it)
    OUT/report.md, summary.json
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_json_atomic, write_text_atomic
from .launcher import fix_plan
from .lr_layout import lr_tag
from .run_files import read_json
from .stats import p_text, welch

ALPHA = 0.05
# arm -> (variant, MEAConfig overrides)
ARMS: dict[str, tuple[str, dict]] = {
    "baseline": ("baseline", {}),
    "mea": ("mea", {}),
    "mea+gain": ("mea", {"mea_head_gain": True}),
    "mea+noweight": ("mea", {"mea_head_norm_weight": False}),
    "mea+blend": ("mea", {"mea_head_norm_blend": True}),
    "mea+warmup": ("mea", {"mea_head_norm_blend": True, "norm_warmup": 0.5}),  # a fraction of the steps
    # the norm's scale apart from its normalisation: a large eps makes RMSNorm nearly linear, x / sqrt(eps) for
    # head outputs of RMS << sqrt(eps) (the report gives the RMS: about 0.1 at init here); a weight of 0.1 at
    # init gives the full norm about the raw output's scale
    "mea+eps0.1": ("mea", {"mea_head_norm_eps": 0.1}),
    "mea+eps1": ("mea", {"mea_head_norm_eps": 1.0}),
    "mea+eps10": ("mea", {"mea_head_norm_eps": 10.0}),
    "mea+w0.1": ("mea", {"mea_head_norm_init": 0.1}),
    "mea+wmeasured": ("mea", {"mea_head_norm_init": "measured"}),
    "mea-no-groupnorm": ("mea-no-groupnorm", {}),
}
DESCRIPTIONS = {
    "baseline": "GQA, no HLC, no GroupNorm",
    "mea": "HLC + GroupNorm (the paper's MEA)",
    "mea+gain": "MEA + a learnable gain per head after the norm (mea_head_gain)",
    "mea+noweight": "MEA, the norm without its per-feature weight (mea_head_norm_weight=False)",
    "mea+blend": "MEA, (1 - a) o + a norm(o) with a learnable a per head from 0 (mea_head_norm_blend)",
    "mea+warmup": "MEA with the norm's strength a raised from 0 to 1 over the first half of training (ends as MEA)",
    "mea+eps0.1": "MEA, the norm's eps 0.1: about 3x the raw output, large outputs compressed",
    "mea+eps1": "MEA, the norm's eps 1: about the raw output (nearly no normalisation)",
    "mea+eps10": "MEA, the norm's eps 10: about 0.32x the raw output, nearly linear",
    "mea+w0.1": "MEA, the norm's weight 0.1 at init: full normalisation at about the raw output's scale",
    "mea+wmeasured": "MEA, the norm's weight at init set to each layer's raw output RMS on a first batch",
    "mea-no-groupnorm": "HLC without GroupNorm",
}


@dataclass
class RecallPlan:
    arms: list = field(default_factory=lambda: ["baseline", "mea", "mea+gain", "mea+noweight", "mea+blend"])
    seeds: list = field(default_factory=lambda: [0, 1])
    lr: float = 1e-3  # the recall setting's rate (results/mqar)
    high_lr: float = 3e-2  # the stability check
    settings: dict = field(default_factory=lambda: dict(pairs=4, queries=4, num_keys=16, num_values=16, steps=800,
                                                        batch=64, eval_size=512))

    def check(self) -> None:
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.lr <= 0 or self.high_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got {self.lr} and {self.high_lr}")


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}__lr{lr_tag(lr)}__s{seed}"


def run_recall_study(out: str | Path, plan: RecallPlan, *, log=print) -> dict:
    """Every MQAR run of `plan` not done yet (recall rate first, then the high rate), then the report."""
    from ..eval.mqar import train_mqar

    plan.check()
    out = Path(out)
    fix_plan(out, asdict(plan), command="mea study recall")
    for lr in (plan.lr, plan.high_lr):
        for seed in plan.seeds:
            for arm in plan.arms:
                path = out / "runs" / f"{run_name(arm, lr, seed)}.json"
                if _read(path) is not None:
                    continue
                variant, overrides = ARMS[arm]
                if "norm_warmup" in overrides:  # given as a fraction of the training steps
                    overrides = {**overrides, "norm_warmup": round(overrides["norm_warmup"] * plan.settings["steps"])}
                result = train_mqar(variant, seed=seed, lr=lr, **plan.settings, **overrides)
                write_json_atomic(path, {"arm": arm, "lr": lr, **result})
                log(f"recall {arm} lr {lr:g} seed {seed}: accuracy {result['accuracy']:.3f}")
        write_report(out)
    return write_report(out)


def _read(path: Path) -> dict | None:
    return read_json(path, fix=f"delete {path} and rerun the study to redo that run")


def load_runs(out: Path) -> tuple[dict, list[dict]]:
    plan = read_json(out / "study.json", fix="delete the folder and rerun the study")
    if plan is None:
        raise ValueError(f"{out} is not a recall study (no study.json); run `mea study recall {out}` first")
    runs = [r for lr in (plan["lr"], plan["high_lr"]) for s in plan["seeds"] for a in plan["arms"]
            if (r := _read(out / "runs" / f"{run_name(a, lr, s)}.json")) is not None]
    return plan, runs


def trained(run: dict) -> bool:
    """The answer loss ended finite and below chance (ln of the number of values)."""
    loss = run["final_train_loss"]
    return math.isfinite(loss) and loss < math.log(run["num_values"])


def summarize(plan: dict, runs: list[dict]) -> dict:
    rows = []
    for lr in (plan["lr"], plan["high_lr"]):
        for arm in plan["arms"]:
            rs = [r for r in runs if r["arm"] == arm and r["lr"] == lr]
            acc = [r["accuracy"] for r in rs]
            row = {"arm": arm, "lr": lr, "seeds": [r["seed"] for r in rs], "accuracy": acc,
                   "mean": float(np.mean(acc)) if acc else None,
                   "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
                   "final_loss": [r["final_train_loss"] for r in rs], "failed": sum(not trained(r) for r in rs),
                   "learned": _learned(rs)}
            for ref in ("mea", "baseline"):
                other = [r["accuracy"] for r in runs if r["arm"] == ref and r["lr"] == lr]
                w = welch(acc, other) if arm != ref else None
                row[f"vs_{ref}"] = None if w is None else {"diff": w["diff"], "p": w["p"]}
            rows.append(row)
    return {"rows": rows, "verdicts": verdicts(plan, rows), "settings": plan["settings"]}


def _learned(rs: list[dict]) -> dict:
    """Mean over seeds (and heads) of each learned norm parameter and of the raw head outputs' RMS, per layer."""
    out = {}
    for name in ("head_gain", "head_norm_blend"):
        per_run = [r["learned"][name] for r in rs if name in r.get("learned", {})]
        if per_run:
            out[name] = [float(np.mean([np.mean(run[layer]) for run in per_run])) for layer in range(len(per_run[0]))]
    for when in ("init", "end"):  # runs from before the RMS was recorded have none
        per_run = [r["head_output_rms"][when] for r in rs if (r.get("head_output_rms") or {}).get(when)]
        if per_run:
            out[f"head output RMS at {when}"] = [float(np.mean(layer)) for layer in zip(*per_run)]
    return out


def verdicts(plan: dict, rows: list[dict]) -> list[str]:
    out = []
    at = {(r["arm"], r["lr"]): r for r in rows}
    if {"baseline", "mea"} <= set(plan["arms"]):
        parts = [f"{at[('mea', lr)]['mean']:.3f} vs the baseline's {at[('baseline', lr)]['mean']:.3f} at lr {lr:g}"
                 + (f" (p {p_text(v['p'])})" if (v := at[("mea", lr)]["vs_baseline"]) else "")
                 for lr in (plan["lr"], plan["high_lr"]) if at[("mea", lr)]["accuracy"] and at[("baseline", lr)]["accuracy"]]
        if parts:
            out.append("MEA recalls " + "; ".join(parts) + ".")
    for arm in plan["arms"]:
        if arm in ("baseline", "mea") or not at[(arm, plan["lr"])]["accuracy"]:
            continue
        r, hi = at[(arm, plan["lr"])], at[(arm, plan["high_lr"])]
        vs_mea, vs_base = r["vs_mea"], r["vs_baseline"]
        if vs_mea is None or vs_base is None:
            out.append(f"{arm}: recall {r['mean']:.3f}; not enough seeds for a test")
            continue
        gap = at[("baseline", plan["lr"])]["mean"] - at[("mea", plan["lr"])]["mean"]
        if vs_mea["p"] >= ALPHA:
            word = "no significant change in recall from MEA's"
        elif vs_mea["diff"] > 0:
            word = ("restores recall (no significant difference from the baseline)" if vs_base["p"] >= ALPHA
                    else f"recovers {vs_mea['diff'] / gap:.0%} of MEA's gap to the baseline" if gap > 0
                    else "recalls better than MEA")
        else:
            word = "recalls worse than MEA"
        text = (f"{arm}: {word}: {r['mean']:.3f} vs MEA {at[('mea', plan['lr'])]['mean']:.3f} (p {p_text(vs_mea['p'])}) "
                f"and baseline {at[('baseline', plan['lr'])]['mean']:.3f} (p {p_text(vs_base['p'])})")
        if hi["accuracy"]:
            text += (f"; at lr {plan['high_lr']:g}: {hi['mean']:.3f}, {hi['failed']}/{len(hi['accuracy'])} runs failed "
                     f"to train (MEA {at[('mea', plan['high_lr'])]['mean'] or float('nan'):.3f}, baseline "
                     f"{at[('baseline', plan['high_lr'])]['mean'] or float('nan'):.3f})")
        out.append(text + ".")
    return out


def render_markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"MQAR ({s['pairs']} pairs, {s['queries']} queries, {s['num_keys']} keys, {s['num_values']} values; "
             f"{s['steps']} steps of {s['batch']} sequences; held-out accuracy on {s['eval_size']} sequences). "
             "p: Welch's t-test over seeds; `failed`: runs whose answer loss ended above chance or not finite.", "",
             "## Verdict", "", *[f"- {v}" for v in summary["verdicts"]], "",
             "| arm | what | lr | accuracy per seed | mean ± std | vs MEA (p) | vs baseline (p) | failed | learned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if not r["accuracy"]:
            continue
        per_seed = ", ".join(f"s{s}: {a:.3f}" for s, a in zip(r["seeds"], r["accuracy"]))
        ms = f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["std"] is not None else "")
        vs = [("—" if v is None else f"{v['diff']:+.3f} ({p_text(v['p'])})") for v in (r["vs_mea"], r["vs_baseline"])]
        learned = "; ".join(f"{k} per layer " + ", ".join(f"{x:.2f}" for x in v) for k, v in r["learned"].items())
        lines.append(f"| {r['arm']} | {DESCRIPTIONS[r['arm']]} | {r['lr']:g} | {per_seed} | {ms} | {vs[0]} | {vs[1]} | "
                     f"{r['failed']}/{len(r['accuracy'])} | {learned or '—'} |")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path) -> dict:
    out = Path(out)
    plan, runs = load_runs(out)
    summary = summarize(plan, runs)
    write_text_atomic(out / "report.md", "# Associative recall and GroupNorm\n\n" + render_markdown(summary))
    write_json_atomic(out / "summary.json", {**summary, "plan": plan})
    return summary
