"""`mea compress --stream`: one decoder layer at a time from safetensors shards, output equal to the in-memory
path, atomic, and the memory guard that names it."""

import json

import pytest
import torch
from helpers import run_cli, save_tiny_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import mea.compress.pipeline as pipeline
import mea.compress.streaming as streaming
from mea.cli import main

SMALL = ["--calib-windows", "6", "--calib-window", "48", "--recover", "none", "--no-eval", "--device", "cpu",
         "--dtype", "fp32"]


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """The tiny Llama saved in several shards (an index), as large checkpoints are."""
    root = save_tiny_llama(tmp_path_factory.mktemp("src"))
    model = LlamaForCausalLM.from_pretrained(root)
    for f in root.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(root, max_shard_size="100KB")
    assert len(list(root.glob("model-*.safetensors"))) > 2 and (root / "model.safetensors.index.json").is_file()
    return root


@pytest.mark.parametrize("extra", [
    pytest.param(["--virtual-heads", "1"], id="whitened"),
    pytest.param(["--virtual-heads", "2", "--layers", "0,2"], id="some-layers", marks=pytest.mark.slow),
    pytest.param(["--virtual-heads", "1", "--method", "svd"], id="svd", marks=pytest.mark.slow),
])
def test_streamed_output_equals_the_in_memory_path(capsys, tmp_path, sharded_llama, extra):
    code, mem, err = run_cli(capsys, "compress", sharded_llama, tmp_path / "mem", *SMALL, *extra)
    assert code == 0, err
    code, streamed, err = run_cli(capsys, "compress", sharded_llama, tmp_path / "stream", *SMALL, *extra, "--stream")
    assert code == 0, err
    assert streamed["plan"] == mem["plan"] and streamed["kv_fraction"] == mem["kv_fraction"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and (a[name] - b[name]).abs().max() <= 1e-6 * a[name].abs().max(), name
    assert len(list((tmp_path / "stream").glob("model-layer-*.safetensors"))) == 3
    assert json.loads((tmp_path / "stream" / "mea_provenance.json").read_text())["streamed"] is True


def test_an_interrupted_streamed_compression_leaves_nothing_and_reruns(capsys, tmp_path, sharded_llama, monkeypatch):
    real, calls = streaming.factor_attention, []

    def dies_at_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between two layers
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "factor_attention", dies_at_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in ("compress", sharded_llama, tmp_path / "out", "--virtual-heads", "1", *SMALL, "--stream")])
    assert list(tmp_path.iterdir()) == []  # no output, no partial directory beside it
    monkeypatch.setattr(streaming, "factor_attention", real)
    code, res, err = run_cli(capsys, "compress", sharded_llama, tmp_path / "out", "--virtual-heads", "1", *SMALL, "--stream")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.component_heads() == [1, 1, 1]
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_too_large_for_memory_names_the_streaming_option(capsys, tmp_path, sharded_llama, monkeypatch):
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 100_000)
    code, _, err = run_cli(capsys, "compress", sharded_llama, tmp_path / "out", "--virtual-heads", "1", *SMALL)
    assert code == 2 and "--stream" in err and "GiB" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--kv-budget", "0.5", "--recover", "none"], "--virtual-heads"),
    (["--virtual-heads", "1"], "--recover none"),
])
def test_what_streaming_does_not_do_is_named(capsys, tmp_path, sharded_llama, argv, message):
    code, _, err = run_cli(capsys, "compress", sharded_llama, tmp_path / "out", *argv, "--stream")
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_streaming_needs_a_checkpoint_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compress", "smollm2", tmp_path / "out", "--virtual-heads", "1", "--recover", "none",
                       "--stream")
    assert code == 2 and "checkpoint directory" in err
