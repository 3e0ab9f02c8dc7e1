"""Training checkpoints: model weights in safetensors, optimizer / scheduler / counters in a torch file
loaded with `weights_only=True` (no code runs on load).

    RUN/checkpoints/step-000200/model.safetensors
    RUN/checkpoints/step-000200/trainer_state.pt
    RUN/checkpoints/latest          -> "step-000200"

A checkpoint directory is written beside its final name and renamed into place; `latest` is replaced
atomically after that, and older checkpoints are deleted last. Killed at any moment, the run keeps a
complete checkpoint that `latest` names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, write_text_atomic


def save_checkpoint(run: Path, step: int, model_state: dict, trainer_state: dict, *, keep: int = 1) -> Path:
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    with atomic_dir(root / name) as tmp:
        tensors, aliases = _dedupe(model_state)
        save_file(tensors, tmp / "model.safetensors", metadata={"aliases": json.dumps(aliases)})
        torch.save(trainer_state, tmp / "trainer_state.pt")
    write_text_atomic(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(run: Path) -> Path | None:
    pointer = run / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run / "checkpoints" / pointer.read_text().strip()
    if not path.is_dir():
        raise ValueError(f"{pointer} names {path.name}, which is missing; the run directory was edited by hand. "
                         "Point it at an existing checkpoints/step-* directory or start again with --overwrite")
    return path


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model state dict, trainer state) from a checkpoint directory; a clear error if it is damaged."""
    try:
        tensors = load_file(path / "model.safetensors")
        with open(path / "model.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        aliases = json.loads(header.get("__metadata__", {}).get("aliases", "{}"))
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, ValueError, EOFError) as e:
        raise ValueError(f"checkpoint {path} is damaged or incomplete ({type(e).__name__}: {e}); delete it and "
                         f"point {path.parent / 'latest'} at an earlier one, or start again with --overwrite") from e
    for dup, kept in aliases.items():
        tensors[dup] = tensors[kept]
    return tensors, trainer_state


def _dedupe(state: dict) -> tuple[dict, dict]:
    """safetensors stores each storage once: tied weights (lm_head = embeddings) are kept under one name."""
    seen, tensors, aliases = {}, {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else (id(v),)
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = v.detach().contiguous()
    return tensors, aliases
