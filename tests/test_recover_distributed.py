"""`torchrun ... -m mea recover`: two CPU processes (gloo) equal one, with DDP and with FSDP2, and a recovery
interrupted in one process resumes under two. Slow: each run starts torchrun and two Python processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import run_cli, save_tiny_llama
from transformers import AutoModelForCausalLM

import mea.compress.recover as recover

pytestmark = pytest.mark.slow

RECOVER = ["--tokens", str(4 * 4 * 32), "--seq-len", "32", "--batch", "4", "--save-every", "2", "--lr", "1e-3",
           "--retrieval-frac", "0", "--precision", "fp32", "--no-eval", "--device", "cpu"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    teacher = save_tiny_llama(root / "teacher")
    code = run_cli_plain("compress", teacher, root / "c", "--virtual-heads", "1", "--recover", "none", "--no-eval",
                         "--calib-windows", "4", "--calib-window", "64", "--device", "cpu", "--dtype", "fp32")
    assert code == 0
    return root, teacher


def run_cli_plain(*argv):
    from mea.cli import main

    return main([str(a) for a in argv])


def torchrun(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mea",
           *map(str, argv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def assert_same_run(a_report, b_report, a_dir, b_dir):
    torch.testing.assert_close(torch.tensor(a_report["distill"]["losses"]), torch.tensor(b_report["distill"]["losses"]),
                               rtol=1e-5, atol=1e-5)
    a, b = weights(a_dir), weights(b_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_processes_equal_one(capsys, tmp_path, dirs, layout):
    root, teacher = dirs
    extra = ["--fsdp"] if layout == "fsdp" else []
    code, one, err = run_cli(capsys, "recover", root / "c", tmp_path / "one", "--teacher", teacher, *RECOVER)
    assert code == 0, err
    two = torchrun("recover", root / "c", tmp_path / "two", "--teacher", teacher, *RECOVER, *extra,
                   "--activation-checkpointing")
    assert two["distill"]["processes"] == 2 and two["distill"]["layout"] == ("fsdp2" if extra else "ddp")
    assert len(one["distill"]["losses"]) == 4
    assert_same_run(one, two, tmp_path / "one", tmp_path / "two")


def test_interrupted_in_one_process_resumes_in_two(capsys, tmp_path, dirs, monkeypatch):
    root, teacher = dirs
    code, straight, err = run_cli(capsys, "recover", root / "c", tmp_path / "straight", "--teacher", teacher, *RECOVER)
    assert code == 0, err
    real = recover.batch_at

    def dies_at_step_3(step, *args, **kwargs):  # after the checkpoint of step 2
        if step == 3:
            raise KeyboardInterrupt
        return real(step, *args, **kwargs)

    monkeypatch.setattr(recover, "batch_at", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_cli(capsys, "recover", root / "c", tmp_path / "b", "--teacher", teacher, *RECOVER)
    assert (tmp_path / "b.state" / "progress.json").is_file() and not (tmp_path / "b").exists()
    resumed = torchrun("recover", root / "c", tmp_path / "b", "--teacher", teacher, *RECOVER, "--fsdp")
    assert resumed["distill"]["processes"] == 2
    assert_same_run(straight, resumed, tmp_path / "straight", tmp_path / "b")
