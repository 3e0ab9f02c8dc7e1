import json

import pytest
import torch
from helpers import randomize_mea, tiny_config

import mea
from mea.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("info", "fold", "demo", "bench"):
        assert sub in out


def test_info_prints_versions_and_registry(capsys):
    code, out, _ = run_cli(capsys, "info")
    data = json.loads(out)
    assert code == 0 and data["versions"]["mea"] == mea.__version__
    assert {"tiny", "smollm2-135m", "llama3.2-1b"} <= set(data["registry"]["presets"])
    assert set(data["registry"]["variants"]) == {"baseline", "groupnorm", "diff", "mea-no-groupnorm", "mea", "mea-gn0.1",
                                                "mea-gn-measured"}


def test_info_reports_kv_bytes_of_a_checkpoint(capsys, tmp_path):
    mea.MEAForCausalLM(tiny_config(mea_num_component_heads=[1, 2])).save_pretrained(tmp_path)
    code, out, _ = run_cli(capsys, "info", str(tmp_path))
    data = json.loads(out)
    # 2 (K, V) x (1 + 2) heads x 16 dims x 2 bytes
    assert data["kv_bytes_per_token"] == 2 * 3 * 16 * 2
    assert data["fraction"] == pytest.approx(3 / 6)


def test_info_rejects_unknown_model(capsys):
    code, _, err = run_cli(capsys, "info", "no-such-thing")
    assert code == 2 and "neither a preset" in err


def test_fold_cli_exports_llama_with_identical_logits(capsys, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(mea_head_norm=False))).eval()
    model.save_pretrained(src)
    code, stdout, _ = run_cli(capsys, "fold", str(src), str(out))
    assert code == 0 and json.loads(stdout)["architecture"] == "LlamaForCausalLM"
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert (plain(ids).logits - model(ids).logits).abs().max() < 1e-4
    # refusing to overwrite leaves the existing output intact
    code, _, err = run_cli(capsys, "fold", str(src), str(out))
    assert code == 2 and "already exists" in err
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_fold_cli_bad_inputs(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fold", str(tmp_path / "missing"), str(tmp_path / "o"))
    assert code == 2 and "not a checkpoint directory" in err
    corrupt = tmp_path / "corrupt"
    mea.MEAForCausalLM(tiny_config()).save_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli(capsys, "fold", str(corrupt), str(tmp_path / "o"))
    assert code == 2 and "could not load" in err
    assert not (tmp_path / "o").exists()


def _check_generated_kv(checks: list[dict], systems: list[str]) -> None:
    """Caches grown by generate(): the stored tokens take exactly the predicted bytes; our caches allocate at
    most one growth block more, transformers' exactly what it stores."""
    from mea.cache import GROWTH_BLOCK

    assert [c["system"] for c in checks] == systems
    for c in checks:
        assert c["tokens"] == 64 + GROWTH_BLOCK - 1 and c["used_error"] == 0, c
        slack = c["kv_bytes_held"] - c["kv_bytes_used"]
        assert 0 <= slack < c["kv_bytes_predicted"] * GROWTH_BLOCK / c["tokens"], c
    assert checks[0]["held_error"] == 0


def test_bench_runs_end_to_end_and_writes_json(capsys, tmp_path):
    out = tmp_path / "d.json"
    code, stdout, _ = run_cli(capsys, "bench", "decode", "--preset", "tiny", "--contexts", "64", "--steps", "2",
                              "--rounds", "2", "--budgets", "0.5", "0.33", "--batches", "2", "--kv-bits", "--out", str(out))
    data = json.loads(out.read_text())
    kv = {r["system"]: r["kv_bytes"] for r in data["results"]}
    assert code == 0 and data["benchmark"] == "decode" and data["machine"]["read_bandwidth_GBps"] > 0
    # tiny: 2 layers x 3 KV heads; budget 0.5 keeps 3 of 6 heads (h' = 1 and 2), 0.33 keeps 2 (h' = 1, 1)
    assert list(kv) == ["transformers-llama", "mea h'=3", "mea folded", "mea KV -50%", "mea KV -67%"]
    full = kv["transformers-llama"]
    assert full == kv["mea h'=3"] == kv["mea folded"] == 2 * kv["mea KV -50%"] == 3 * kv["mea KV -67%"]
    assert all(r["of_bound"] > 0 and len(r["all_ms"]) == 4 for r in data["results"])
    _check_generated_kv(data["kv_generate"], ["transformers-llama", "mea h'=3", "mea folded", "mea KV -50%",
                                              "mea KV -67%"])
    assert (tmp_path / "d.md").read_text().count("| 2 | 64 |") == 5 and (tmp_path / "d.png").stat().st_size > 0
    for what, extra, systems in (("prefill", ["--contexts", "32", "--repeats", "1"], 4),
                                 ("memory", ["--contexts", "64", "--steps", "1", "--kv-bits", "4"], 6)):
        out = tmp_path / f"{what}.json"
        code, _, _ = run_cli(capsys, "bench", what, "--preset", "tiny", "--budgets", "0.33", *extra, "--out", str(out))
        data = json.loads(out.read_text())
        assert code == 0 and data["benchmark"] == what and len(data["results"]) == systems
        assert (tmp_path / f"{what}.md").exists() and (tmp_path / f"{what}.png").stat().st_size > 0
    held = {r["system"]: r["kv_bytes"] for r in data["results"]}  # the memory results
    # float caches hold what they predict; a quantized one also a float tail of under one group at 64 tokens
    assert all(r["kv_bytes"] == r["kv_bytes_predicted"] for r in data["results"] if "int" not in r["system"])
    assert held["mea h'=3 int4"] < held["mea h'=3"] / 2 and held["mea KV -67% int4"] < held["mea KV -67%"] / 2
    _check_generated_kv(data["kv_generate"], ["transformers-llama", "mea h'=3", "mea folded", "mea h'=3 int4",
                                              "mea KV -67%", "mea KV -67% int4"])
    code, stdout, _ = run_cli(capsys, "bench", "train", "--preset", "tiny", "--batch", "2", "--seq", "16",
                              "--steps", "1", "--repeats", "1")
    data = json.loads(stdout)
    assert set(data["ratios"]) == {"groupnorm/baseline", "mea-no-groupnorm/baseline", "mea/baseline",
                                   "baseline/transformers-llama"}
    assert "diff" in data["skipped"]  # tiny has 3 KV heads: Differential attention needs an even count
    assert all(b > 0 for b in data["peak_step_memory_bytes"].values())


def test_kv_budget_spreads_component_heads_over_layers():
    from mea.bench.systems import heads_for_budget

    heads = heads_for_budget(3, 30, 0.5)  # 45 of 90 component heads: 15 layers at h'=2, 15 at h'=1
    assert sum(heads) == 45 and sorted(set(heads)) == [1, 2] and heads.count(2) == 15
    assert heads_for_budget(3, 30, 0.67) == [2] * 30 and heads_for_budget(3, 30, 0.1) == [1] * 30  # h' >= 1
    with pytest.raises(ValueError, match="fraction of the cache kept"):
        heads_for_budget(3, 30, 1.5)
