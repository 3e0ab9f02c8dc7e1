"""Scaling curves of the paper's variants: validation loss against training tokens D, per variant and model
size, each variant at its best learning rate from the learning-rate study, 2+ seeds, then the paper's fit
L(D) = (D_c / D)^alpha + L_0 and the gap of each variant to the baseline (see scaling_report.py).

The schedule is constant after a linear warm-up (`min_lr_ratio = 1`): the loss at every intermediate D is
the loss of a run stopped there, which is what an L(D) fit over one run's curve assumes (a cosine schedule
would tie each point to the total length). Validation losses are taken at the same log-spaced token counts
in every run (`eval_points` from the end of warm-up to the largest budget), on fixed windows spread over the
validation split.

Training data: the training splits of both text domains (Shakespeare without Hamlet, Python documentation
prose); their held-out texts (Hamlet, the Debian Reference) and every evaluation set stay out.

Runs advance in rounds: every run is first trained to `rounds[0]` tokens (paused, checkpointed), then to
`rounds[1]`, ..., then to its size's budget, smallest sizes first within a round, so a report written at any
time compares all variants and seeds at the same D. Files: see launcher.py, plus OUT/report.md,
summary.json and the plots of scaling_report.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..train.config import TrainConfig
from .launcher import Task, fix_plan, run_tasks
from .run_files import read_json
from .scaling_layout import rate_of, run_name, study_variants
from .scaling_report import write_report

VARIANTS = ["baseline", "groupnorm", "mea-no-groupnorm", "mea"]
LR_STUDY_SUMMARY = Path(__file__).resolve().parents[3] / "results" / "lr-study-quick" / "summary.json"
DATA = ["domain:shakespeare", "domain:modern"]


@dataclass
class ScalingPlan:
    sizes: dict  # model preset -> token budget of each of its runs
    lrs: dict  # variant -> peak learning rate; "size:variant" -> that size's rate where it differs
    seeds: list
    rounds: list  # token counts every run pauses at, in order, before its final budget
    train: dict  # TrainConfig fields shared by every run (sequence length, batch, warm-up, evaluation)
    eval_points: int = 24  # log-spaced validation points from the end of warm-up to the largest budget
    data: list = field(default_factory=lambda: list(DATA))

    @property
    def variants(self) -> list[str]:
        return study_variants(self.lrs)

    @property
    def tokens_per_step(self) -> int:
        return self.train["seq_len"] * self.train["batch_size"]


STUDIES: dict[str, ScalingPlan] = {
    # 3 sizes (0.45M, 1.3M, 3.2M parameters; one 2k-token vocabulary so losses compare) x 4 variants x 2 seeds,
    # 4096 tokens a step. One CPU core: micro ~10k tokens/s, mini ~3k, midi ~2k; the first round (2M tokens
    # each) takes ~0.5 h for micro's 8 runs, ~4.5 h for all 24; the whole study ~35 core-hours (it resumes).
    "cpu": ScalingPlan(sizes={"micro": 20_000_000, "mini": 20_000_000, "midi": 10_000_000}, lrs={}, seeds=[0, 1],
                       rounds=[2_000_000, 5_000_000, 10_000_000],
                       train=dict(seq_len=256, batch_size=16, warmup_steps=100, eval_windows=96, log_every=25,
                                  save_every=250)),
    # an accelerator: the 8.6M and 32M presets (8k vocabulary), 200M tokens each, 32k tokens a step
    "gpu": ScalingPlan(sizes={"small": 200_000_000, "medium": 200_000_000}, lrs={}, seeds=[0, 1, 2],
                       rounds=[20_000_000, 60_000_000],
                       train=dict(seq_len=512, batch_size=64, warmup_steps=300, eval_windows=256, log_every=50,
                                  save_every=500)),
}


def best_lrs(variants: list[str], path: Path | None = None) -> dict:
    """Each variant's best learning rate from the learning-rate study's summary.json (default LR_STUDY_SUMMARY)."""
    path = path or LR_STUDY_SUMMARY
    summary = read_json(path, fix="rerun `mea study report results/lr-study-quick`, or give --lrs")
    if summary is None:
        raise ValueError(f"no learning-rate study results at {path}; give each variant's rate with "
                         "--lrs VARIANT=LR ... (e.g. baseline=3e-3 mea=1e-2)")
    best = summary.get("best_lr", {})
    missing = [v for v in variants if best.get(v) is None]
    if missing:
        raise ValueError(f"{path} has no best learning rate for {missing}; give them with --lrs VARIANT=LR")
    return {v: best[v] for v in variants}


def parse_lrs(items: list[str]) -> dict:
    """["mea=1e-2", "midi:mea=3e-3", ...] -> {"mea": 0.01, "midi:mea": 0.003, ...} (SIZE:VARIANT: one size's rate)"""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name or name.count(":") > 1 or name.startswith(":") or name.endswith(":"):
            raise ValueError(f"--lrs expects VARIANT=LR or SIZE:VARIANT=LR (e.g. mea=1e-2 midi:mea=3e-3), got {item!r}")
    return out


def make_plan(study: str, *, variants=None, lrs: dict | None = None, seeds=None, sizes=None, tokens=None,
              rounds=None, data=None) -> ScalingPlan:
    """The preset `study` with overrides: `sizes` presets (each with the preset's largest budget unless
    listed there), `tokens` one budget for every size, `lrs` rates that replace the study's (SIZE:VARIANT
    keys: one size's rate)."""
    if study not in STUDIES:
        raise ValueError(f"unknown scaling study preset {study!r}; choose one of {', '.join(STUDIES)}")
    base = STUDIES[study]
    variants = list(variants or VARIANTS)
    lrs = dict(lrs or {})
    missing = [v for v in variants if v not in lrs]
    rates = {**(best_lrs(missing) if missing else {}), **lrs}
    unknown = sorted({k.partition(":")[2] or k for k in rates} - set(variants))
    if unknown:
        raise ValueError(f"--lrs names variants not in the study: {unknown}; add them to --variants")
    budget = max(base.sizes.values())
    chosen = {s: base.sizes.get(s, budget) for s in (sizes or base.sizes)}
    if tokens is not None:
        chosen = {s: int(tokens) for s in chosen}
    other_sizes = sorted({k.partition(":")[0] for k in rates if ":" in k} - set(chosen))
    if other_sizes:
        raise ValueError(f"--lrs names sizes not in the study: {other_sizes}; add them to --sizes")
    per_size = {k: rates[k] for k in sorted(rates) if ":" in k}
    plan = ScalingPlan(sizes=chosen, lrs={**{v: rates[v] for v in variants}, **per_size},
                       seeds=list(seeds if seeds is not None else base.seeds),
                       rounds=sorted(rounds if rounds is not None else base.rounds), train=dict(base.train),
                       eval_points=base.eval_points, data=list(data or base.data))
    for t in run_tasks_of(plan):
        t.config.check()  # unknown presets or variants, bad rates: fail before any run starts
    return plan


def steps_for(plan: ScalingPlan, tokens: int) -> int:
    return max(1, math.ceil(tokens / plan.tokens_per_step))


def eval_steps(plan: ScalingPlan) -> list[int]:
    """The log-spaced validation steps, the same for every run (from the end of warm-up to the largest budget)."""
    first = max(1, plan.train["warmup_steps"])
    last = steps_for(plan, max(plan.sizes.values()))
    if last <= first:
        return [last]
    n = max(2, plan.eval_points)
    return sorted({round(first * (last / first) ** (i / (n - 1))) for i in range(n)})


def run_config(plan: ScalingPlan, size: str, variant: str, seed: int) -> TrainConfig:
    steps = steps_for(plan, plan.sizes[size])
    return TrainConfig(preset=size, variant=variant, lr=rate_of(plan.lrs, size, variant), seed=seed, data=list(plan.data),
                       steps=steps, min_lr_ratio=1.0, eval_every=steps, eval_spread=True,
                       eval_steps=[s for s in eval_steps(plan) if s < steps], **plan.train)


def run_tasks_of(plan: ScalingPlan) -> list[Task]:
    """Every (run, round) in the order they are trained: round by round, then size, seed, variant."""
    tasks = []
    for r in [*plan.rounds, None]:
        for size, budget in plan.sizes.items():
            if r is not None and r >= budget:
                continue
            for seed in plan.seeds:
                for v in plan.variants:
                    tasks.append(Task(run_name(size, v, seed), run_config(plan, size, v, seed),
                                      None if r is None else steps_for(plan, r)))
    return tasks


def check_rates(out: Path, tasks: list[Task]) -> None:
    """A per-size rate added to a study in progress must not continue a run begun at another rate: name them."""
    begun = {}
    for name, lr in {t.name: t.config.lr for t in tasks}.items():  # a run's rounds share one config
        saved = read_json(out / "runs" / name / "run.json", fix=f"delete {out / 'runs' / name} to redo that run")
        if saved and saved.get("config", {}).get("lr") != lr:
            begun[name] = saved["config"]["lr"]
    if begun:
        runs = ", ".join(f"{n} (lr {lr:g})" for n, lr in sorted(begun.items()))
        raise ValueError(f"runs in {out} began at another learning rate than the plan's: {runs}; move them out of "
                         f"{out / 'runs'} (to keep them elsewhere) to train them again at the plan's rate, or rerun "
                         "without the rate that changed")


def run_scaling(out: str | Path, plan: ScalingPlan, *, jobs: int = 1, log=print) -> dict:
    """Run (or continue) every round of `plan` under `out`, then write the report."""
    out = Path(out)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    fix_plan(out, asdict(plan), command="mea study scaling", growing="lrs")  # variants and per-size rates may be added
    tasks = run_tasks_of(plan)
    check_rates(out, tasks)
    failed = []
    for r in [*plan.rounds, None]:  # a report after every size of every round
        until = None if r is None else steps_for(plan, r)
        for size in plan.sizes:
            group = [t for t in tasks if t.until == until and t.config.preset == size and t.name not in failed]
            if group:
                failed += run_tasks(out, group, jobs=jobs, log=log)
                summary = write_report(out)
    return {"study": str(out), "runs": len({t.name for t in tasks}), "failed": failed,
            "report": str(out / "report.md"), "verdicts": summary["verdicts"]}
