"""The paper's learning-rate sweep and ablation as a reproducible study: variants x learning rates x seeds,
same data and token budget, one `mea train` run each, then a report.

    OUT/study.json, configs/, runs/, logs/   see mea.experiments.launcher: finished or diverged runs are
                                             skipped on rerun, interrupted ones resume from their checkpoint
    OUT/report.md, summary.json, lr_sweep.png, curves.png
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..train.config import TrainConfig
from .launcher import Task, fix_plan, run_tasks
from .lr_layout import VARIANT_ORDER, run_name
from .lr_report import write_report


@dataclass
class StudyPlan:
    preset: str
    lrs: list
    seeds: list
    train: dict
    variants: list = field(default_factory=lambda: list(VARIANT_ORDER))
    data: list = field(default_factory=list)


STUDIES: dict[str, StudyPlan] = {
    # 5 variants x 6 rates (1e-3 .. 3e-1: stable to divergent for the baseline) x 3 seeds = 90 runs of 150 steps
    # x 2048 tokens (0.3M tokens, the 1.3M-parameter "mini" model): about 45 minutes on 2 CPU cores, --jobs 2
    "quick": StudyPlan(preset="mini", lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], seeds=[0, 1, 2],
                       train=dict(seq_len=128, batch_size=16, steps=150, warmup_steps=15, eval_every=30,
                                  eval_windows=48, log_every=10, save_every=50)),
    # the paper's rates (plus 1e-2) on the 10M-parameter "small" model: 2000 steps x 8k tokens (16M tokens,
    # several epochs of the embedded corpus; pass --data with more text for a cleaner test). A GPU job.
    "full": StudyPlan(preset="small", lrs=[1e-4, 5e-4, 1e-3, 3e-3, 1e-2], seeds=[0, 1, 2],
                      train=dict(seq_len=256, batch_size=32, steps=2000, warmup_steps=200, eval_every=100,
                                 eval_windows=128, log_every=20, save_every=250)),
}


def make_plan(study: str, *, variants=None, lrs=None, seeds=None, steps=None, data=None) -> StudyPlan:
    if study not in STUDIES:
        raise ValueError(f"unknown study preset {study!r}; choose one of {', '.join(STUDIES)}")
    base = STUDIES[study]
    plan = StudyPlan(preset=base.preset, lrs=list(lrs or base.lrs), seeds=list(seeds if seeds is not None else base.seeds),
                     train={**base.train, **({"steps": steps} if steps else {})},
                     variants=list(variants or base.variants), data=list(data or base.data))
    for cfg in run_configs(plan).values():
        cfg.check()  # unknown variants, bad rates: fail before any run starts
    return plan


def run_configs(plan: StudyPlan) -> dict[str, TrainConfig]:
    return {run_name(v, lr, s): TrainConfig(preset=plan.preset, variant=v, lr=lr, seed=s, data=plan.data, **plan.train)
            for v in plan.variants for lr in plan.lrs for s in plan.seeds}


def run_study(out: str | Path, plan: StudyPlan, *, jobs: int = 1, log=print) -> dict:
    """Run every unfinished run of `plan` under `out`, `jobs` at a time, then write the report."""
    out = Path(out)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    fix_plan(out, asdict(plan), command="mea study lr")
    configs = run_configs(plan)
    failed = run_tasks(out, [Task(name, cfg) for name, cfg in configs.items()], jobs=jobs, log=log)
    summary = write_report(out)
    return {"study": str(out), "runs": len(configs), "failed": failed, "report": str(out / "report.md"),
            "claims": [{k: c[k] for k in ("claim", "verdict")} for c in summary["claims"]]}
