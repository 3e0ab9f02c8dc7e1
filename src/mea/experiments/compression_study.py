"""Compression sensitivity map: downstream accuracy by task category x KV-compression level, each level
training-free and after recovery, for one model (default: the embedded SmolLM2).

Every step is a `mea` command run as a subprocess and skipped when its output exists, so the study
resumes where it stopped:

    OUT/models/kv33-free     mea compress SRC ... --virtual-heads 2 --recover none          (training-free)
    OUT/models/kv33-fit      mea compress SRC ... --virtual-heads 2 --fit-mode teacher      (start of recovery)
    OUT/models/kv33-rec      mea recover OUT/models/kv33-fit ... --teacher SRC --tokens T   (after recovery)
    OUT/evals/NAME.mc.json   mea eval tasks MODEL --tasks knowledge reasoning --limit N
    OUT/evals/NAME.math.json mea eval tasks MODEL --tasks math --limit M      (generation: the slow part)
    OUT/report.md, summary.json, sensitivity.png
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..plotting import pyplot, save_figure
from .stats import two_proportions

LEVELS = {  # name -> (compress arguments, KV fraction kept)
    "kv33": (["--virtual-heads", "2"], 2 / 3),
    "kv50": (["--kv-budget", "0.5"], 0.5),
    "kv67": (["--virtual-heads", "1"], 1 / 3),
}
CATEGORIES = ("knowledge", "reasoning", "math")


def plan_steps(src: str, out: Path, *, levels: list[str], limit: int, math_limit: int, tokens: int,
               fit_steps: int) -> list[tuple]:
    """(output path, command) in order; a step whose output exists is done."""
    mea = [sys.executable, "-m", "mea"]

    def evaluate(name: str, model: str) -> list[tuple]:
        """Multiple-choice categories at `limit` examples per task, math (generation, the slow part) at
        `math_limit`."""
        mc, math = out / "evals" / f"{name}.mc", out / "evals" / f"{name}.math"
        return [(Path(f"{mc}.json"), mea + ["eval", "tasks", model, "--tasks", "knowledge", "reasoning", "--limit",
                                            str(limit), "--out", str(mc)]),
                (Path(f"{math}.json"), mea + ["eval", "tasks", model, "--tasks", "math", "--limit", str(math_limit),
                                              "--out", str(math)])]

    steps = evaluate("original", src)  # each evaluation right after its model, so partial runs report
    for level in levels:
        args, _ = LEVELS[level]
        free, fit, rec = (out / "models" / f"{level}-{k}" for k in ("free", "fit", "rec"))
        steps.append((free, mea + ["compress", src, str(free), *args, "--recover", "none", "--no-eval"]))
        steps += evaluate(f"{level}-free", str(free))
        steps.append((fit, mea + ["compress", src, str(fit), *args, "--fit-mode", "teacher", "--fit-steps",
                                  str(fit_steps), "--no-eval"]))
        steps.append((rec, mea + ["recover", str(fit), str(rec), "--teacher", src, "--tokens", str(tokens),
                                  "--lr", "2e-4", "--no-eval"]))
        steps += evaluate(f"{level}-rec", str(rec))
    return steps


def run_compression_study(out: str | Path, *, src: str = "smollm2", levels: list[str] | None = None, limit: int = 100,
                          math_limit: int = 30, tokens: int = 150_000, fit_steps: int = 60, log=print) -> dict:
    out = Path(out)
    levels = levels or list(LEVELS)
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise ValueError(f"unknown level(s) {unknown}; choose from {', '.join(LEVELS)}")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = plan_steps(src, out, levels=levels, limit=limit, math_limit=math_limit, tokens=tokens, fit_steps=fit_steps)
    for i, (target, cmd) in enumerate(steps, 1):
        if target.exists():
            continue
        log(f"[{i}/{len(steps)}] {' '.join(cmd[2:])}")
        with open(out / "logs" / f"{target.name}.log", "a") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise ValueError(f"step failed (exit {code}): {' '.join(cmd[2:])}; see {out / 'logs' / (target.name + '.log')}")
    return write_report(out, levels=levels)


def write_report(out: Path, *, levels: list[str]) -> dict:
    rows = []
    for name in ["original"] + [f"{lv}-{k}" for lv in levels for k in ("free", "rec")]:
        parts = [out / "evals" / f"{name}.{kind}.json" for kind in ("mc", "math")]
        tasks = [t for p in parts if p.is_file() for t in json.loads(p.read_text())["tasks"]]
        if not tasks:
            continue
        level = name.split("-")[0]
        kv = 1.0 if level == "original" else LEVELS[level][1]
        cats = {c: _mean([t["value"] for t in tasks if t["category"] == c]) for c in CATEGORIES}
        rows.append({"model": name, "kv_fraction": kv, "categories": cats, "tasks": {t["task"]: t for t in tasks}})
    base = rows[0]["categories"] if rows and rows[0]["model"] == "original" else None
    lines = ["| model | KV kept | " + " | ".join(CATEGORIES) + " | tasks (acc, n) |", "|---|---|" + "---|" * (len(CATEGORIES) + 1)]
    for r in rows:
        cells = []
        for c in CATEGORIES:
            v = r["categories"][c]
            delta = f" ({v - base[c]:+.3f})" if base and v is not None and base[c] is not None and r["model"] != "original" else ""
            cells.append("—" if v is None else f"{v:.3f}{delta}")
        detail = ", ".join(f"{k} {t['value']:.2f}" for k, t in r["tasks"].items())
        n = max((t["n"] for t in r["tasks"].values()), default=0)
        lines.append(f"| {r['model']} | {r['kv_fraction']:.2f} | " + " | ".join(cells) + f" | {detail} (n≤{n}) |")
    significant = []
    if rows and rows[0]["model"] == "original":
        for r in rows[1:]:
            for task, t in r["tasks"].items():
                o = rows[0]["tasks"].get(task)
                if o and (p := two_proportions(t["value"], t["n"], o["value"], o["n"])) < 0.05:
                    significant.append(f"{r['model']} {task}: {t['value']:.2f} vs {o['value']:.2f} (p={p:.3g})")
    lines += ["", "Differences from the original that are significant at p < 0.05 (two-proportion z-test per task): "
              + ("; ".join(significant) if significant else "none") + "."]
    md = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.md", md)
    summary = {"rows": rows}
    write_json_atomic(out / "summary.json", summary)
    if rows:
        _plot(out / "sensitivity.png", rows)
    return {"report": str(out / "report.md"), "models": [r["model"] for r in rows]}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for c, color in zip(CATEGORIES, ("tab:blue", "tab:orange", "tab:green")):
        for kind, style in (("free", "--"), ("rec", "-")):
            pts = sorted((r["kv_fraction"], r["categories"][c]) for r in rows
                         if (r["model"] == "original" or r["model"].endswith(kind)) and r["categories"][c] is not None)
            if len(pts) > 1:
                ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{c} ({'recovered' if kind == 'rec' else 'training-free'})")
    ax.invert_xaxis()
    ax.set_xlabel("fraction of the KV cache kept")
    ax.set_ylabel("mean accuracy in category")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)
