"""The compression sensitivity study: its plan of commands, and its report from evaluation files."""

import json

import pytest

from mea.experiments.compression_study import plan_steps, run_compression_study, write_report


def test_plan_has_free_and_recovered_models_and_evaluations(tmp_path):
    steps = plan_steps("smollm2", tmp_path, levels=["kv33", "kv67"], limit=10, math_limit=3, tokens=1000,
                       fit_steps=5)
    targets = [t.name for t, _ in steps]
    assert targets[:8] == ["original.mc.json", "original.math.json", "kv33-free", "kv33-free.mc.json",
                           "kv33-free.math.json", "kv33-fit", "kv33-rec", "kv33-rec.mc.json"]
    assert len([t for t in targets if t.endswith(".math.json")]) == 5
    math = dict((t.name, c) for t, c in steps)["kv67-rec.math.json"]
    assert math[-6:] == ["--tasks", "math", "--limit", "3", "--out", str(tmp_path / "evals" / "kv67-rec.math")]
    rec = dict((t.name, c) for t, c in steps)["kv67-rec"]
    assert rec[3:6] == ["recover", str(tmp_path / "models" / "kv67-fit"), str(tmp_path / "models" / "kv67-rec")]
    with pytest.raises(ValueError, match="unknown level"):
        run_compression_study(tmp_path, levels=["kv90"])


def test_report_from_evaluations(tmp_path):
    (tmp_path / "evals").mkdir()

    def tasks(k, r):
        return {"tasks": [{"task": "mmlu", "category": "knowledge", "value": k, "n": 200, "ci95": [0, 1]},
                          {"task": "piqa", "category": "reasoning", "value": r, "n": 200, "ci95": [0, 1]}]}

    for name, k, r in (("original", 0.60, 0.60), ("kv33-free", 0.30, 0.55), ("kv33-rec", 0.58, 0.59)):
        (tmp_path / "evals" / f"{name}.mc.json").write_text(json.dumps(tasks(k, r)))
    result = write_report(tmp_path, levels=["kv33"])
    assert result["models"] == ["original", "kv33-free", "kv33-rec"]
    md = (tmp_path / "report.md").read_text()
    # pooled category accuracy with its Wilson interval; * only where the drop is significant (0.60 -> 0.30, n=200)
    assert "| kv33-free | 0.67 | 0.300* [0.24, 0.37] (200) | 0.550 [0.48, 0.62] (200) | — |" in md
    assert "| mmlu | knowledge | 200 | 0.60 | 0.30* | 0.58 |" in md
    assert "knowledge training-free: first significant drop at kv33-free (KV kept 0.67)" in md
    assert "knowledge recovered: no significant drop" in md and "reasoning training-free: no significant drop" in md
    assert (tmp_path / "sensitivity.png").stat().st_size > 0


def test_corrupt_evaluation_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "original.mc.json").write_text('{"tasks": [{"task": "mm')
    with pytest.raises(ValueError, match=r"original\.mc\.json is corrupt.*rerun the study"):
        write_report(tmp_path, levels=["kv33"])
    (tmp_path / "evals" / "original.mc.json").write_text('{"results": []}')
    with pytest.raises(ValueError, match=r"original\.mc\.json has no list of tasks"):
        write_report(tmp_path, levels=["kv33"])
