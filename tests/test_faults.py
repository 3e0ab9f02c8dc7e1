"""Crash safety: atomic writes under kills, checksums, refused pickle payloads; and (slow) a small run of
scripts/fault_injection.py (SIGKILL at random moments, rerun, compare with an uninterrupted run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mea.atomic import atomic_dir, remove_stale, write_text_atomic
from mea.checkpoint import load_torch_state, verify_checksums, write_checksums
from mea.train.state import check_architecture, latest_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_atomic_dir_replaces_a_directory_whole_and_leaves_it_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("killed")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale_dir = tmp_path / f".out.tmp-{pid}-abc"
    stale_dir.mkdir()
    (tmp_path / f".x.json.tmp-{pid}-def").write_text("half")
    mine = tmp_path / f".out.tmp-{os.getpid()}-ghi"  # a live writer's (this process): kept
    mine.mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    write_text_atomic(tmp_path / "x.json", "{}")
    assert not stale_dir.exists() and not (tmp_path / f".x.json.tmp-{pid}-def").exists() and mine.exists()
    remove_stale(tmp_path / "nothing")


def test_checksums_catch_a_flipped_bit(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(64, dtype=torch.float32)}, tmp_path / "model.safetensors")
    write_checksums(tmp_path)
    verify_checksums(tmp_path, fix="rewrite it")
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-10] ^= 1
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors does not match its checksum.*rewrite it"):
        verify_checksums(tmp_path, fix="rewrite it")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_does_not_run(tmp_path):
    torch.save({"step": 3, "x": _Payload(tmp_path / "ran")}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="refusing to load it.*start over"):
        load_torch_state(tmp_path / "state.pt", fix="start over")
    assert not (tmp_path / "ran").exists()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_checkpoints_refuse_damage_and_other_architectures(tmp_path):
    import mea

    model = mea.MEAForCausalLM(mea.make_config("tiny", "mea"))
    save_checkpoint(tmp_path, 2, _state(model), {"step": 2})
    save_checkpoint(tmp_path, 4, _state(model), {"step": 4})
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000004"]
    tensors, ts = load_checkpoint(ckpt)
    assert ts == {"step": 4} and torch.equal(tensors["lm_head.weight"], model.lm_head.weight)
    check_architecture(tensors, model.state_dict(), ckpt)
    other = mea.MEAForCausalLM(mea.make_config("tiny", "mea", num_hidden_layers=1))
    with pytest.raises(ValueError, match="another architecture.*--overwrite"):
        check_architecture(tensors, other.state_dict(), ckpt)
    f = ckpt / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(ValueError, match="checksum.*--overwrite"):
        load_checkpoint(ckpt)


@pytest.mark.slow
def test_fault_injection_small(tmp_path):
    """One kill per command for train and recover, and the damaged-file cases; everything must survive."""
    cmd = [sys.executable, str(ROOT / "scripts" / "fault_injection.py"), "--out", str(tmp_path / "res"), "--doc",
           str(tmp_path / "reliability.md"), "--commands", "train", "recover", "--kills-per-command", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "res" / "faults.json").read_text())
    total = result["summary"]["total"]
    assert total["kills"] >= 3 and total["survived"] == total["kills"] and total["data_lost"] == 0
    assert all(r["passed"] is not False for r in result["special"]) and len(result["special"]) >= 10
    assert "SIGKILLs" in (tmp_path / "reliability.md").read_text()
