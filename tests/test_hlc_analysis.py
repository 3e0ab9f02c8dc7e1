"""HLC analysis: movement against a reference, head importance by removal, and the plot."""

import json

import pytest
import torch

import mea
from helpers import randomize_mea, tiny_config
from mea.eval.hlc_analysis import analyze_hlc, plot_hlc, spearman


def test_movement_importance_and_plot(tmp_path):
    model = mea.MEAForCausalLM(tiny_config()).eval()
    reference = mea.MEAForCausalLM(tiny_config()).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.model.layers[1].self_attn.hlc_v[:, 2] += 0.5  # move one head's column in layer 1 only
    ids = torch.randint(0, 97, (2, 16))
    result = analyze_hlc(model, ids, reference=reference)
    l0, l1 = result["layers"]
    assert l0["moved_k"] == 0 and l0["moved_v"] == 0 and l1["moved_k"] == 0 and l1["moved_v"] > 0
    assert l1["head_moved"][2] == pytest.approx(0.5 * 3**0.5) and l1["head_moved"][:2] == [0.0, 0.0]
    # removing a head changes the loss, and the model is restored afterwards
    assert any(abs(x) > 1e-6 for row in (l0["importance"], l1["importance"]) for x in row)
    before = model(ids).logits
    analyze_hlc(model, ids)
    torch.testing.assert_close(model(ids).logits, before)
    plot_hlc(result, tmp_path / "hlc.png")
    assert (tmp_path / "hlc.png").stat().st_size > 0


def test_without_reference_compares_with_the_configured_init():
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(mea_num_component_heads=[3, 1])).eval())
    result = analyze_hlc(model, torch.randint(0, 97, (1, 8)))
    assert result["reference"] == "configured initialisation" and all(l["moved_k"] > 0 for l in result["layers"])
    assert [l["h_prime"] for l in result["layers"]] == [3, 1]


def test_baseline_model_is_refused_and_spearman():
    with pytest.raises(ValueError, match="no HLC"):
        analyze_hlc(mea.MEAForCausalLM(tiny_config(mea_hlc=False)), torch.randint(0, 97, (1, 8)))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_eval_hlc_command_in_bf16_records_its_placement(tmp_path, capsys):
    from helpers import run_cli, save_tiny_llama

    src = save_tiny_llama(tmp_path / "llama")
    assert run_cli(capsys, "convert", src, tmp_path / "mea")[0] == 0
    code, result, err = run_cli(capsys, "eval", "hlc", tmp_path / "mea", tmp_path / "hlc", "--device", "cpu",
                                "--dtype", "bf16", "--windows", "1", "--window", "32")
    assert code == 0, err
    saved = json.loads((tmp_path / "hlc" / "hlc.json").read_text())
    assert saved["placement"]["precision"] == "bf16" and saved["placement"]["device"] == "cpu"
    assert len(saved["layers"]) == 3 and all(len(l["importance"]) == 3 for l in saved["layers"])
