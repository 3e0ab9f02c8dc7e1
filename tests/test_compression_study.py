"""The compression sensitivity study: its plan of commands, and its report from evaluation files."""

import json

import pytest

from mea.experiments.compression_study import plan_steps, run_compression_study, write_report


def test_plan_has_free_and_recovered_models_and_evaluations(tmp_path):
    steps = plan_steps("smollm2", tmp_path, levels=["kept67", "kept33"], limit=10, math_limit=3, tokens=1000,
                       fit_steps=5)
    targets = [t.name for t, _ in steps]
    assert targets[:8] == ["original.mc.json", "original.math.json", "kept67-free", "kept67-free.mc.json",
                           "kept67-free.math.json", "kept67-fit", "kept67-rec", "kept67-rec.mc.json"]
    assert len([t for t in targets if t.endswith(".math.json")]) == 5
    math = dict((t.name, c) for t, c in steps)["kept33-rec.math.json"]
    assert math[-6:] == ["--tasks", "math", "--limit", "3", "--out", str(tmp_path / "evals" / "kept33-rec.math")]
    rec = dict((t.name, c) for t, c in steps)["kept33-rec"]
    assert rec[3:6] == ["recover", str(tmp_path / "models" / "kept33-fit"), str(tmp_path / "models" / "kept33-rec")]
    with pytest.raises(ValueError, match="unknown level"):
        run_compression_study(tmp_path, levels=["kv90"])


def test_plan_places_every_command_that_loads_a_model(tmp_path):
    steps = dict((t.name, c) for t, c in plan_steps("smollm2", tmp_path, levels=["kept50"], limit=10, math_limit=3,
                                                      tokens=1000, fit_steps=5, device="cuda:1", dtype="bf16"))
    for name in ("original.mc.json", "kept50-free", "kept50-fit", "kept50-rec.math.json"):
        cmd = steps[name]
        assert cmd[cmd.index("--device") + 1] == "cuda:1" and cmd[cmd.index("--dtype") + 1] == "bf16", name
    rec = steps["kept50-rec"]  # recovery takes the device; it trains fp32 weights (its --precision is autocast)
    assert rec[rec.index("--device") + 1] == "cuda:1" and "--dtype" not in rec
    plain = plan_steps("smollm2", tmp_path, levels=["kept50"], limit=10, math_limit=3, tokens=1000, fit_steps=5)
    assert not any("--device" in c or "--dtype" in c for _, c in plain)  # each command's own defaults


def test_report_from_evaluations(tmp_path):
    (tmp_path / "evals").mkdir()

    def tasks(k, r):  # piqa as `mea eval tasks` wrote it before it was scored by acc_norm: read as acc_norm
        return {"tasks": [{"task": "mmlu", "category": "knowledge", "metric": "acc", "value": k, "n": 200,
                           "ci95": [0, 1], "acc_norm": 0.99},
                          {"task": "piqa", "category": "reasoning", "metric": "acc", "value": r - 0.1, "n": 200,
                           "ci95": [0, 1], "acc_norm": r}]}

    # kv33-rec: written under the earlier level name (KV -33%), adopted as kept67-rec
    for name, k, r in (("original", 0.60, 0.60), ("kept67-free", 0.30, 0.55), ("kv33-rec", 0.58, 0.59)):
        (tmp_path / "evals" / f"{name}.mc.json").write_text(json.dumps(tasks(k, r)))
    result = write_report(tmp_path, levels=["kept67"])
    assert result["models"] == ["original", "kept67-free", "kept67-rec"]
    assert (tmp_path / "evals" / "kept67-rec.mc.json").is_file() and not list((tmp_path / "evals").glob("kv*"))
    md = (tmp_path / "report.md").read_text()
    # pooled category accuracy with its Wilson interval; * only where the drop is significant (0.60 -> 0.30, n=200)
    assert "| kept67-free | 0.67 | 0.300* [0.24, 0.37] (200) | 0.550 [0.48, 0.62] (200) | — |" in md
    assert "| mmlu | knowledge | 200 | acc | 0.60 | 0.30* | 0.58 |" in md
    assert "| piqa | reasoning | 200 | acc_norm (acc) | 0.60 (0.50) | 0.55 (0.45) | 0.59 (0.49) |" in md
    assert "by acc_norm for HellaSwag, ARC-Easy, ARC-Challenge, OpenBookQA and PIQA" in md
    assert "knowledge training-free: first significant drop at kept67-free (KV kept 0.67)" in md
    assert "knowledge recovered: no significant drop" in md and "reasoning training-free: no significant drop" in md
    assert (tmp_path / "sensitivity.png").stat().st_size > 0


def test_corrupt_evaluation_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "original.mc.json").write_text('{"tasks": [{"task": "mm')
    with pytest.raises(ValueError, match=r"original\.mc\.json is corrupt.*rerun the study"):
        write_report(tmp_path, levels=["kept67"])
    (tmp_path / "evals" / "original.mc.json").write_text('{"results": []}')
    with pytest.raises(ValueError, match=r"original\.mc\.json has no list of tasks"):
        write_report(tmp_path, levels=["kept67"])
