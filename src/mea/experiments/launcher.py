"""Running a study's training runs: each one a separate `python -m mea train --resume` process, `jobs` at a
time with cores / jobs threads (OMP_NUM_THREADS when it is set), so that a killed study loses at most the steps since each run's last
checkpoint and a rerun continues where it stopped.

    OUT/study.json         the plan (fixed at the first start; a rerun must ask for the same one)
    OUT/configs/NAME.json  each run's TrainConfig
    OUT/runs/NAME/         each run (see mea.train.loop)
    OUT/logs/NAME.log      each run's output
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json_atomic
from ..train.config import TrainConfig
from .run_files import read_json

DONE = ("finished", "diverged")


@dataclass
class Task:
    name: str  # the run's folder under OUT/runs
    config: TrainConfig
    until: int | None = None  # stop the run after this step (paused), None: train it to the end


def fix_plan(out: Path, plan: dict, *, command: str, growing: str | None = None) -> None:
    """Write the plan to OUT/study.json, or check that it equals the one already there. `growing`: a key of the
    plan whose mapping may gain entries (a study extended, e.g. by a variant: the runs already made are kept),
    the other keys and the saved entries unchanged."""
    plan_path = out / "study.json"
    plan = json.loads(json.dumps(plan))
    if plan_path.is_file():
        saved = json.loads(plan_path.read_text())
        grown = growing is not None and {k: v for k, v in plan.items() if k != growing} == \
            {k: v for k, v in saved.items() if k != growing} and \
            all(plan[growing].get(k) == v for k, v in saved.get(growing, {}).items())
        if saved != plan and not grown:
            extend = f" (adding to its {growing} is allowed)" if growing else ""
            raise ValueError(f"{out} holds a study with another plan ({plan_path}){extend}; rerun `{command}` with the "
                             "same options to continue, or choose a new output directory")
    write_json_atomic(plan_path, plan)


def run_status(run: Path) -> dict | None:
    return read_json(run / "status.json", fix=f"delete {run} and rerun the study to redo that run")


def is_done(out: Path, task: Task) -> bool:
    status = run_status(out / "runs" / task.name)
    if status is None:
        return False
    return status.get("state") in DONE or (task.until is not None and status.get("step", 0) >= task.until)


def run_tasks(out: Path, tasks: list[Task], *, jobs: int = 1, log=print) -> list[str]:
    """Run every task not done yet, in order, `jobs` at a time; returns the names of runs that failed."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    pending = [t for t in tasks if not is_done(out, t)]
    log(f"study {out}: {len(tasks)} tasks, {len(tasks) - len(pending)} already done, {len(pending)} to run")
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // jobs))
    running: dict[str, tuple[Task, subprocess.Popen]] = {}
    failed = []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < jobs and not any(t.name == pending[0].name for t, _ in running.values()):
            task = pending.pop(0)  # a run's later rounds wait for its earlier ones
            running[task.name] = (task, _launch(out, task, threads))
        time.sleep(0.5)
        for name, (task, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            state = (run_status(out / "runs" / name) or {}).get("state")
            if proc.returncode != 0:
                failed.append(name)
                pending = [t for t in pending if t.name != name]
            done = len(tasks) - len(pending) - len(running)
            until = f" until step {task.until}" if task.until else ""
            log(f"[{done}/{len(tasks)} {time.time() - t0:.0f}s] {name}{until}: {state or 'failed'}"
                + (f" (exit {proc.returncode}, see {out / 'logs' / (name + '.log')})" if proc.returncode else ""))
    return failed


def _launch(out: Path, task: Task, threads: int) -> subprocess.Popen:
    cfg_path = out / "configs" / f"{task.name}.json"
    write_json_atomic(cfg_path, task.config.to_dict())
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_file = open(out / "logs" / f"{task.name}.log", "a")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)  # each run is one process, even under a launcher
    cmd = [sys.executable, "-m", "mea", "train", "--config", str(cfg_path), "--out", str(out / "runs" / task.name),
           "--resume", "--quiet"] + ([] if task.until is None else ["--until", str(task.until)])
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
