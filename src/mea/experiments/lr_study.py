"""The paper's learning-rate sweep and ablation as a reproducible study: variants x learning rates x seeds,
same data and token budget, one `mea train` run each, then a report.

    OUT/study.json            the plan (fixed at the first start; a rerun must ask for the same one)
    OUT/configs/NAME.json     each run's TrainConfig
    OUT/runs/NAME/            each run (see mea.train.loop); finished or diverged runs are skipped on rerun,
                              interrupted ones resume from their checkpoint
    OUT/logs/NAME.log         each run's output
    OUT/report.md, summary.json, lr_sweep.png, curves.png

Runs are separate processes (`python -m mea train ... --resume`), `jobs` at a time, each with
cores / jobs threads: a killed study loses at most the steps since each run's last checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_json_atomic
from ..train.config import TrainConfig
from .lr_layout import VARIANT_ORDER, run_name
from .lr_report import write_report
from .run_files import read_json


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
    plan_path = out / "study.json"
    if plan_path.is_file():
        saved = json.loads(plan_path.read_text())
        if saved != json.loads(json.dumps(asdict(plan))):
            raise ValueError(f"{out} holds a study with another plan ({plan_path}); rerun it with the same options "
                             "to continue, or choose a new output directory")
    write_json_atomic(plan_path, asdict(plan))
    configs = run_configs(plan)
    pending = [name for name in configs if _state(out / "runs" / name) not in ("finished", "diverged")]
    log(f"study {out}: {len(configs)} runs, {len(configs) - len(pending)} already done, {len(pending)} to run")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: dict[str, subprocess.Popen] = {}
    failed = []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            running[name] = _launch(out, name, configs[name], threads)
        time.sleep(0.5)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            state = _state(out / "runs" / name)
            if proc.returncode != 0:
                failed.append(name)
            done = len(configs) - len(pending) - len(running)
            log(f"[{done}/{len(configs)} {time.time() - t0:.0f}s] {name}: {state or 'failed'}"
                + (f" (exit {proc.returncode}, see {out / 'logs' / (name + '.log')})" if proc.returncode else ""))
    summary = write_report(out)
    return {"study": str(out), "runs": len(configs), "failed": failed, "report": str(out / "report.md"),
            "claims": [{k: c[k] for k in ("claim", "verdict")} for c in summary["claims"]]}


def _launch(out: Path, name: str, cfg: TrainConfig, threads: int) -> subprocess.Popen:
    cfg_path = out / "configs" / f"{name}.json"
    write_json_atomic(cfg_path, cfg.to_dict())
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_file = open(out / "logs" / f"{name}.log", "a")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)  # each run is one process, even under a launcher
    cmd = [sys.executable, "-m", "mea", "train", "--config", str(cfg_path), "--out", str(out / "runs" / name),
           "--resume", "--quiet"]
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def _state(run: Path) -> str | None:
    status = read_json(run / "status.json", fix=f"delete {run} and rerun the study to redo that run")
    return None if status is None else status.get("state")
