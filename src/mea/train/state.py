"""Training checkpoints: model weights in safetensors, optimizer / scheduler / counters in a torch file
loaded with `weights_only=True` (no code runs on load).

    RUN/checkpoints/step-000200/model.safetensors
    RUN/checkpoints/step-000200/trainer_state.pt
    RUN/checkpoints/latest          -> "step-000200"

A checkpoint directory is written beside its final name and renamed into place; `latest` is replaced
atomically after that, and older checkpoints are deleted last. Killed at any moment, the run keeps a
complete checkpoint that `latest` names. Each checkpoint lists the sha256 of its files
(`checksums.sha256`), checked on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, is_temporary, remove_stale, remove_tree, write_text_atomic
from ..checkpoint import load_torch_state, verify_checksums, write_checksums


def save_checkpoint(run: Path, step: int, model_state: dict, trainer_state: dict, *, keep: int = 1) -> Path:
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    with atomic_dir(root / name) as tmp:
        tensors, aliases = _dedupe(model_state)
        save_file(tensors, tmp / "model.safetensors", metadata={"aliases": json.dumps(aliases)})
        with open(tmp / "trainer_state.pt", "wb") as f:
            torch.save(trainer_state, f)
        write_checksums(tmp)
    write_text_atomic(root / "latest", name + "\n")
    prune_checkpoints(run, keep=keep)
    return root / name


def prune_checkpoints(run: Path, *, keep: int = 1) -> None:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names) and the temporaries of
    writes that were killed."""
    root = run / "checkpoints"
    if not root.is_dir():
        return
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    for entry in root.iterdir():
        if is_temporary(entry.name):
            remove_stale(root / entry.name[1:].split(".tmp-")[0])
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        if old.name != named:
            remove_tree(old)


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
    fix = (f"delete {path} and point {path.parent / 'latest'} at an earlier checkpoint if there is one, or start "
           "again with --overwrite")
    verify_checksums(path, fix=fix)
    try:
        tensors = load_file(path / "model.safetensors")
        with open(path / "model.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        aliases = json.loads(header.get("__metadata__", {}).get("aliases", "{}"))
    except (OSError, SafetensorError, RuntimeError, ValueError, EOFError) as e:
        raise ValueError(f"checkpoint {path} is damaged or incomplete ({type(e).__name__}: {e}); {fix}") from e
    trainer_state = load_torch_state(path / "trainer_state.pt", fix=fix)
    for dup, kept in aliases.items():
        tensors[dup] = tensors[kept]
    return tensors, trainer_state


def check_architecture(tensors: dict, expected: dict, path: Path) -> None:
    """The checkpoint's tensors must be the model's (same names and shapes): a checkpoint of another
    architecture or size is refused before anything is loaded."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or extra or shapes:
        detail = "; ".join(f"{what}: {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                           (("missing", missing), ("unexpected", extra), ("other shape", shapes)) if names)
        raise ValueError(f"checkpoint {path} is of another architecture than this run's model ({detail}); it does "
                         f"not belong to {path.parent.parent}. Put back the run's own checkpoint, or start again "
                         "with --overwrite")


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
