"""`mea train`: learning, exact resume, DDP/FSDP2 parity, divergence as a result, bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mea
from mea.data import corpus_dir
from mea.train import TrainConfig, train
from mea.train import loop as train_loop
from mea.train.distributed import Dist

STEPS = dict(seq_len=32, batch_size=4, steps=12, warmup_steps=2, log_every=1, eval_every=4, eval_windows=4,
             save_every=4)


@pytest.fixture
def text(tmp_path_factory, monkeypatch):
    """Two plays as user text (a fast token cache), and a private cache directory."""
    d = tmp_path_factory.mktemp("text")
    for name in ("macbeth_gut.txt", "tempest_gut.txt"):
        (d / name).write_text((corpus_dir() / name).read_text(encoding="utf-8")[:60_000])
    monkeypatch.setenv("MEA_CACHE", str(tmp_path_factory.mktemp("cache")))
    return d


def _cfg(text, **kw) -> TrainConfig:
    return TrainConfig(**{"preset": "tiny", "variant": "mea", "data": [str(text)], **STEPS, **kw})


def _losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.parametrize("variant", ["mea", "diff"])
def test_training_lowers_the_loss_and_the_model_loads(text, tmp_path, variant):
    kw = {"model": {"num_key_value_heads": 2}} if variant == "diff" else {}
    result = train(_cfg(text, variant=variant, steps=30, lr=3e-3, **kw), tmp_path / "run", progress=False)
    assert result["state"] == "finished"
    losses = _losses(tmp_path / "run", "val_loss")
    assert losses[-1] < losses[0] - 0.5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    ids = torch.randint(0, 100, (1, 8))
    assert model(ids).logits.shape == (1, 8, model.config.vocab_size)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["environment"]["torch"] == torch.__version__ and run["config"]["variant"] == variant


def test_resume_equals_uninterrupted(text, tmp_path, monkeypatch):
    cfg = _cfg(text)
    train(cfg, tmp_path / "a", progress=False)
    real_batch = train_loop.train_batch

    def interrupted(*args, step, **kw):
        if step == 10:  # killed between checkpoints (the last one is at step 8)
            raise KeyboardInterrupt
        return real_batch(*args, step=step, **kw)

    monkeypatch.setattr(train_loop, "train_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "status.json").read_text())["state"] == "running"
    monkeypatch.setattr(train_loop, "train_batch", real_batch)
    train(None, tmp_path / "b", resume=True, progress=False)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # bit-identical sequence
    assert _losses(tmp_path / "b", "val_loss") == _losses(tmp_path / "a", "val_loss")


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_processes_equal_one(text, tmp_path, layout):
    cfg = _cfg(text, fsdp=layout == "fsdp", precision="fp32")  # float32: the tolerance below is float32's
    train(cfg, tmp_path / "one", progress=False)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mea", "train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "two"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["environment"]["world_size"] == 2 and run["environment"]["parallel"] == ("fsdp2" if layout == "fsdp" else "ddp")
    torch.testing.assert_close(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_losses(tmp_path / "two", "val_loss"), _losses(tmp_path / "one", "val_loss"),
                               rtol=1e-5, atol=1e-5)


def test_divergence_stops_cleanly_and_keeps_the_last_checkpoint(text, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_init = mea.MEAForCausalLM.__init__

    def init_with_nan_at_step_7(self, config):
        real_init(self, config)

        def poison(_module, _inputs, output):
            if not torch.is_grad_enabled():  # evaluation
                return output
            calls["n"] += 1
            return output * float("nan") if calls["n"] >= 7 else output  # NaN from the 7th training step on

        self.lm_head.register_forward_hook(poison)

    monkeypatch.setattr(mea.MEAForCausalLM, "__init__", init_with_nan_at_step_7)
    result = train(_cfg(text), tmp_path / "run", progress=False)
    assert result["state"] == "diverged" and "nan" in result["reason"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "diverged" and status["step"] == 6
    assert status["last_checkpoint"].endswith("step-000004")
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "model").exists()


def test_loss_spike_detection():
    assert train_loop._divergence(5.0, 1.0, 4.0, 3.8, 1.0) is None
    assert "spike" in train_loop._divergence(30.0, 1.0, 4.0, 3.8, 1.0)
    assert "gradient" in train_loop._divergence(4.0, float("inf"), 4.0, 3.8, 1.0)


def test_bad_inputs_give_clear_errors_and_lose_nothing(text, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no text found"):
        train(_cfg(empty), tmp_path / "r0", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train(_cfg(tmp_path / "missing.txt"), tmp_path / "r1", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        train(_cfg(text, preset="huge"), tmp_path / "r2", progress=False)
    with pytest.raises(ValueError, match="unknown config field"):
        train(_cfg(text, model={"num_layerz": 2}), tmp_path / "r3", progress=False)
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ValueError, match="must divide into 3 processes"):
        train_loop._resolve_run_dir(_cfg(text), tmp_path / "r4", Dist(world=3), resume=False, overwrite=False)
    # a tokenizer with more tokens than the model's vocabulary
    from mea.train.data import train_tokenizer

    tok = train_tokenizer([(text / "macbeth_gut.txt").read_text()], 600)
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="vocab_size is 512"):
        train(_cfg(text, tokenizer=str(tmp_path / "tok")), tmp_path / "r5", progress=False)

    # an existing run is neither overwritten nor resumed by accident; a damaged checkpoint is reported, kept
    cfg = _cfg(text, steps=4)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="differ from the run's saved config: \\['lr'\\]"):
        train(_cfg(text, steps=4, lr=0.5), tmp_path / "run", resume=True, progress=False)
    weights = tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged"):
        train(None, tmp_path / "run", resume=True, progress=False)
    assert weights.is_file() and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="unknown preset"):  # bad options never delete the old run
        train(_cfg(text, preset="huge"), tmp_path / "run", overwrite=True, progress=False)
    assert (tmp_path / "run" / "run.json").is_file()


def test_cli_train_reports_errors_with_exit_code_2(text, tmp_path, capsys):
    from mea.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), "--preset", "tiny", "--set", "bogus=1"]) == 2
    assert "unknown config field" in capsys.readouterr().err
    code = main(["train", "--out", str(tmp_path / "r"), "--preset", "tiny", "--data", str(text), "--steps", "3",
                 "--seq-len", "32", "--batch-size", "2", "--set", "num_hidden_layers=1", "--quiet"])
    assert code == 0 and json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "finished"
