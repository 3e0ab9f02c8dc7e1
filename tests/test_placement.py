"""--device and --dtype: one default (mea.precision), checked names, recorded in results; the compression
agrees between fp32 and bf16 on the CPU."""

import pytest
import torch
from helpers import run_cli, save_tiny_llama
from safetensors.torch import load_file

from mea import precision


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("src"))


def test_default_device_and_dtype_follow_the_hardware(monkeypatch):
    assert precision.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(precision, "cpu_capability", lambda: {"cpu_native_bf16": False})
    assert precision.placement("cpu") == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(precision, "cpu_capability", lambda: {"cpu_native_bf16": True})
    assert precision.placement("cpu") == (torch.device("cpu"), torch.bfloat16)
    assert precision.placement("cpu", "fp32")[1] == torch.float32
    with pytest.raises(ValueError, match="fp32, bf16"):
        precision.placement("cpu", "fp16")
    with pytest.raises(ValueError, match="not a device name"):
        precision.resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("argv", [["eval", "ppl", "smollm2"], ["probe", "smollm2", "out"], ["eval", "mqar"],
                                  ["compress", "smollm2", "out", "--virtual-heads", "1"],
                                  ["recover", "a", "b", "--teacher", "smollm2"],
                                  ["eval", "needle", "smollm2", "out"], ["eval", "tasks", "smollm2"]])
def test_a_missing_gpu_is_named_before_any_work(capsys, tmp_path, argv):
    code, _, err = run_cli(capsys, *[a if a != "out" else tmp_path / "out" for a in argv], "--device", "cuda")
    assert code == 2 and "no CUDA device is visible" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()


def test_results_record_where_and_in_what_they_ran(capsys, tiny_llama_dir):
    code, res, err = run_cli(capsys, "eval", "ppl", tiny_llama_dir, "--windows", "1", "--window", "32",
                         "--device", "cpu", "--dtype", "fp32")
    assert code == 0, err
    assert res["placement"]["device"] == "cpu" and res["placement"]["precision"] == "fp32"
    assert "cpu_native_bf16" in res["placement"]


def test_compression_in_fp32_and_bf16_agrees(capsys, tmp_path, tiny_llama_dir):
    """The factorisation runs in float64 either way: the weights differ by the bf16 rounding of the model and
    of its calibration activations (bf16 keeps 8 bits: relative error 2^-8 = 0.4% per value)."""
    outs = {}
    for dtype in ("fp32", "bf16"):
        code, res, err = run_cli(capsys, "compress", tiny_llama_dir, tmp_path / dtype, "--virtual-heads", "1",
                             "--calib-windows", "4", "--calib-window", "64", "--recover", "none", "--no-eval",
                             "--device", "cpu", "--dtype", dtype)
        assert code == 0, err
        assert res["placement"]["precision"] == dtype
        outs[dtype] = load_file(tmp_path / dtype / "model.safetensors")
    assert outs["bf16"]["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16
    assert outs["fp32"].keys() == outs["bf16"].keys()
    for i in range(3):  # the composite heads sum_m W_lc[m, j] W_m (what attention sees; h' = 1 here)
        for kind in "kv":
            heads = {d: torch.einsum("mh,mdc->hdc", o[f"model.layers.{i}.self_attn.hlc_{kind}"].double(),
                                     o[f"model.layers.{i}.self_attn.{kind}_proj.weight"].double().view(1, 16, -1))
                     for d, o in outs.items()}
            rel = (heads["fp32"] - heads["bf16"]).norm() / heads["fp32"].norm()
            assert rel < 0.02, (i, kind, rel.item())
