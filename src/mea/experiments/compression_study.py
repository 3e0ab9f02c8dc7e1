"""Compression sensitivity map: downstream accuracy by task category x KV-compression level, each level
training-free and after recovery, for one model (default: the embedded SmolLM2).

Every step is a `mea` command run as a subprocess and skipped when its output exists, so the study
resumes where it stopped:

    OUT/models/kept67-free   mea compress SRC ... --virtual-heads 2 --recover none          (training-free)
    OUT/models/kept67-fit    mea compress SRC ... --virtual-heads 2 --fit-mode teacher      (start of recovery)
    OUT/models/kept67-rec    mea recover OUT/models/kept67-fit ... --teacher SRC --tokens T   (after recovery)
    OUT/evals/NAME.mc.json   mea eval tasks MODEL --tasks knowledge reasoning --limit N
    OUT/evals/NAME.math.json mea eval tasks MODEL --tasks math --limit M      (generation: the slow part)
    OUT/report.md, summary.json, sensitivity.png
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..plotting import pyplot, save_figure
from ..eval.harness import METRIC_NOTE, scored, wilson_interval
from .run_files import read_json
from .stats import two_proportions

LEVELS = {  # name (the percentage of the KV cache kept) -> (compress arguments, KV fraction kept)
    "kept67": (["--virtual-heads", "2"], 2 / 3),
    "kept50": (["--kv-budget", "0.5"], 0.5),
    "kept33": (["--virtual-heads", "1"], 1 / 3),
}
LEGACY_LEVELS = {"kv33": "kept67", "kv50": "kept50", "kv67": "kept33"}  # earlier names: the percentage removed
CATEGORIES = ("knowledge", "reasoning", "math")


def plan_steps(src: str, out: Path, *, levels: list[str], limit: int, math_limit: int, tokens: int,
               fit_steps: int, device: str | None = None, dtype: str | None = None) -> list[tuple]:
    """(output path, command) in order; a step whose output exists is done. `device`, `dtype`: passed to every
    command that takes them (None: each command's own default); recovery trains fp32 weights."""
    mea = [sys.executable, "-m", "mea"]
    on = ["--device", device] if device else []
    placed = on + (["--dtype", dtype] if dtype else [])

    def evaluate(name: str, model: str) -> list[tuple]:
        """Multiple-choice categories at `limit` examples per task, math (generation, the slow part) at
        `math_limit`."""
        mc, math = out / "evals" / f"{name}.mc", out / "evals" / f"{name}.math"
        return [(Path(f"{mc}.json"), mea + ["eval", "tasks", model, "--tasks", "knowledge", "reasoning", "--limit",
                                            str(limit), "--out", str(mc), *placed]),
                (Path(f"{math}.json"), mea + ["eval", "tasks", model, "--tasks", "math", "--limit", str(math_limit),
                                              "--out", str(math), *placed])]

    steps = evaluate("original", src)  # each evaluation right after its model, so partial runs report
    for level in levels:
        args, _ = LEVELS[level]
        free, fit, rec = (out / "models" / f"{level}-{k}" for k in ("free", "fit", "rec"))
        steps.append((free, mea + ["compress", src, str(free), *args, "--recover", "none", "--no-eval", *placed]))
        steps += evaluate(f"{level}-free", str(free))
        steps.append((fit, mea + ["compress", src, str(fit), *args, "--fit-mode", "teacher", "--fit-steps",
                                  str(fit_steps), "--no-eval", *placed]))
        steps.append((rec, mea + ["recover", str(fit), str(rec), "--teacher", src, "--tokens", str(tokens),
                                  "--lr", "2e-4", "--no-eval", *on]))
        steps += evaluate(f"{level}-rec", str(rec))
    return steps


def run_compression_study(out: str | Path, *, src: str = "smollm2", levels: list[str] | None = None, limit: int = 100,
                          math_limit: int = 30, tokens: int = 150_000, fit_steps: int = 60, device: str | None = None,
                          dtype: str | None = None, log=print) -> dict:
    out = Path(out)
    levels = [LEGACY_LEVELS.get(lv, lv) for lv in levels or LEVELS]
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise ValueError(f"unknown level(s) {unknown}; choose from {', '.join(LEVELS)}")
    adopt_legacy_names(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = plan_steps(src, out, levels=levels, limit=limit, math_limit=math_limit, tokens=tokens, fit_steps=fit_steps,
                       device=device, dtype=dtype)
    for i, (target, cmd) in enumerate(steps, 1):
        if target.exists():
            continue
        log(f"[{i}/{len(steps)}] {' '.join(cmd[2:])}")
        with open(out / "logs" / f"{target.name}.log", "a") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise ValueError(f"step failed (exit {code}): {' '.join(cmd[2:])}; see {out / 'logs' / (target.name + '.log')}")
    return write_report(out, levels=levels)


def adopt_legacy_names(out: Path) -> None:
    """Rename the models, evaluations and logs of a study run under the earlier level names (kv33 = KV -33%)
    to the current ones (kept67 = KV kept 67%), so that it continues instead of starting over."""
    for sub in ("models", "evals", "logs"):
        for path in sorted((out / sub).glob("kv*")) if (out / sub).is_dir() else []:
            old, _, rest = path.name.partition("-")
            target = path.with_name(f"{LEGACY_LEVELS[old]}-{rest}") if old in LEGACY_LEVELS and rest else None
            if target is not None and not target.exists():
                path.rename(target)


def write_report(out: Path, *, levels: list[str]) -> dict:
    """report.md: accuracy by category (pooled over its tasks) and by task for every model evaluated so far,
    with 95% intervals, the differences from the original that are significant, and for each category the
    first compression level where it breaks; summary.json; sensitivity.png."""
    adopt_legacy_names(out)
    rows = []
    for name in ["original"] + [f"{lv}-{k}" for lv in levels for k in ("free", "rec")]:
        tasks = []
        for kind in ("mc", "math"):
            path = out / "evals" / f"{name}.{kind}.json"
            result = read_json(path, fix="delete it and rerun the study to redo that evaluation")
            if result is not None:
                if not isinstance(result.get("tasks"), list):
                    raise ValueError(f"{path} has no list of tasks (not a `mea eval tasks` result); delete it and "
                                     "rerun the study to redo that evaluation")
                tasks += map(scored, result["tasks"])
        if not tasks:
            continue
        level = name.split("-")[0]
        kv = 1.0 if level == "original" else LEVELS[level][1]
        cats = {c: _pooled([t for t in tasks if t["category"] == c]) for c in CATEGORIES}
        rows.append({"model": name, "kv_fraction": kv, "categories": cats, "tasks": {t["task"]: t for t in tasks}})
    original = rows[0] if rows and rows[0]["model"] == "original" else None
    lines = _category_table(rows, original) + [""] + _task_table(rows, original)
    if original:
        lines += ["", _breaks_first(rows, original)]
    md = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.md", md)
    write_json_atomic(out / "summary.json", {"rows": rows})
    if rows:
        _plot(out / "sensitivity.png", rows)
    return {"report": str(out / "report.md"), "models": [r["model"] for r in rows]}


def _pooled(tasks: list[dict]) -> dict | None:
    """A category's accuracy: correct answers over all its examples (tasks weighted by their n)."""
    n = sum(t["n"] for t in tasks)
    if not n:
        return None
    acc = sum(t["value"] * t["n"] for t in tasks) / n
    return {"value": acc, "n": n, "ci95": wilson_interval(acc, n)}


def _significant(a: dict, b: dict) -> float | None:
    p = two_proportions(a["value"], a["n"], b["value"], b["n"])
    return p if p < 0.05 else None


def _cell(x: dict | None, original: dict | None) -> str:
    if x is None:
        return "—"
    lo, hi = x["ci95"]
    mark = "*" if original is not None and x is not original and _significant(x, original) else ""
    return f"{x['value']:.3f}{mark} [{lo:.2f}, {hi:.2f}]"


def _category_table(rows: list[dict], original: dict | None) -> list[str]:
    lines = ["| model | KV kept | " + " | ".join(f"{c} (n)" for c in CATEGORIES) + " |",
             "|---|---|" + "---|" * len(CATEGORIES)]
    for r in rows:
        cells = []
        for c in CATEGORIES:
            x = r["categories"][c]
            cells.append(_cell(x, original and original["categories"][c]) + (f" ({x['n']})" if x else ""))
        lines.append(f"| {r['model']} | {r['kv_fraction']:.2f} | " + " | ".join(cells) + " |")
    return lines + ["", "Category accuracy pools the examples of its tasks, each scored by its metric in the table "
                    "below; [95% Wilson interval]; * differs from the original at p < 0.05 (two-proportion z-test, "
                    "unpaired: conservative, as every model answers the same examples)."]


def _task_table(rows: list[dict], original: dict | None) -> list[str]:
    names = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    lines = ["| task | category | n | scored by | " + " | ".join(r["model"] for r in rows) + " |",
             "|---|---|---|---|" + "---|" * len(rows)]
    for task in names:
        first = next(r["tasks"][task] for r in rows if task in r["tasks"])
        shows_acc = first["metric"] != "acc" and "acc" in first
        cells = []
        for r in rows:
            t = r["tasks"].get(task)
            o = original and original["tasks"].get(task)
            mark = "*" if t and o and t is not o and _significant(t, o) else ""
            cells.append("—" if t is None else f"{t['value']:.2f}{mark}" + (f" ({t['acc']:.2f})" if shows_acc else ""))
        metric = first["metric"] + (" (acc)" if shows_acc else "")
        lines.append(f"| {task} | {first['category']} | {first['n']} | {metric} | " + " | ".join(cells) + " |")
    return lines + ["", f"Per task: the score, with acc in parentheses where the score is acc_norm; * differs from "
                    f"the original at p < 0.05. {METRIC_NOTE} With n = 50 a 95% interval is about ±0.13, so most "
                    "single-task differences are not significant."]


def _breaks_first(rows: list[dict], original: dict) -> str:
    """For each category and kind (training-free, recovered): the mildest level whose pooled accuracy is
    significantly below the original's."""
    parts = []
    for c in CATEGORIES:
        for kind, label in (("free", "training-free"), ("rec", "recovered")):
            broken = sorted((r["kv_fraction"], r["model"]) for r in rows if r["model"].endswith(kind)
                            and r["categories"][c] and original["categories"][c]
                            and r["categories"][c]["value"] < original["categories"][c]["value"]
                            and _significant(r["categories"][c], original["categories"][c]))
            parts.append(f"{c} {label}: " + (f"first significant drop at {broken[-1][1]} (KV kept {broken[-1][0]:.2f})"
                                             if broken else "no significant drop at any level evaluated"))
    return "Which categories break first: " + "; ".join(parts) + "."


def _plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for c, color in zip(CATEGORIES, ("tab:blue", "tab:orange", "tab:green")):
        for kind, style in (("free", "--"), ("rec", "-")):
            pts = sorted((r["kv_fraction"], r["categories"][c]["value"]) for r in rows
                         if (r["model"] == "original" or r["model"].endswith(kind)) and r["categories"][c] is not None)
            if len(pts) > 1:
                label = f"{c} ({'recovered' if kind == 'rec' else 'training-free'})"
                ax.plot(*zip(*pts), style, marker="o", color=color, label=label)
    ax.invert_xaxis()
    ax.set_xlabel("fraction of the KV cache kept")
    ax.set_ylabel("accuracy in category (pooled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)
