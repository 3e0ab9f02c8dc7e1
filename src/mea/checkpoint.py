"""Saving and loading Hugging Face checkpoints safely: atomic directory writes, safetensors only."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .atomic import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def load_causal_lm(path: str | Path, *, dtype: torch.dtype | str = torch.float32) -> PreTrainedModel:
    """Load a local causal-LM checkpoint directory (safetensors weights; never runs checkpoint code). dtype "auto":
    as stored."""
    import mea  # noqa: F401  (registers model_type "mea")

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint directory (expected config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    verify_checksums(path, fix="write it again with the command that made it")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except ValueError:
        raise
    except Exception as e:  # missing or corrupt weights surface as OSError, SafetensorError, KeyError, ...
        hint = (" The weights do not fit its config.json (another architecture or size; the shapes are listed "
                "above): put back the config.json that was saved with these weights" if "mismatch" in str(e) else "")
        raise ValueError(f"could not load the model in {path}: {type(e).__name__}: {e}{hint}") from e
    return model


def save_atomic(model: PreTrainedModel, out: str | Path, *, copy_from: str | Path | None = None,
                tokenizer=None, extra_json: dict[str, object] | None = None, overwrite: bool = False) -> Path:
    """Write `model` (safetensors), its tokenizer (an object, or the files found in `copy_from`) and
    `extra_json` files into `out`; the directory appears complete or not at all (written beside it,
    then renamed)."""
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        if copy_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(copy_from) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        write_checksums(tmp)
    return out


CHECKSUMS = "checksums.sha256"


def write_checksums(directory: Path) -> None:
    """`checksums.sha256` (the `sha256sum` format) for the weight and state files in `directory`
    (*.safetensors, *.pt): safetensors carries no checksum of its own, so a flipped bit in a weight would
    otherwise load silently. Text files (config, tokenizer) stay editable by hand."""
    lines = [f"{_sha256(p)}  {p.name}\n" for p in sorted(Path(directory).iterdir())
             if p.is_file() and p.suffix in (".safetensors", ".pt")]
    (Path(directory) / CHECKSUMS).write_text("".join(lines))


def verify_checksums(directory: Path, *, fix: str) -> None:
    """Check the files listed in `checksums.sha256` (directories written before it existed pass)."""
    listing = Path(directory) / CHECKSUMS
    if not listing.is_file():
        return
    for line in listing.read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = Path(directory) / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (listed in {listing}); the directory is incomplete: {fix}")
        if _sha256(path) != digest:
            raise ValueError(f"{path} does not match its checksum in {listing}: the file is damaged (truncated "
                             f"or altered on disk); {fix}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def load_torch_state(path: str | Path, *, fix: str):
    """A torch state file (optimizer, scheduler, counters) loaded with `weights_only=True`: only tensors and
    plain containers; a file that carries other Python objects (a pickle payload that could run code) is
    refused with a clear error."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects other than tensors and plain containers; refusing to load "
                         f"it (unpickling could run code). mea never writes such a file, so it was replaced or "
                         f"tampered with: {fix}") from e
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is damaged or incomplete ({type(e).__name__}: {e}); {fix}") from e


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> None:
    """Fail before any work if `out` would be clobbered."""
    if Path(out).exists() and not overwrite:
        raise ValueError(f"{out} already exists; choose another output directory or pass --overwrite")


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None):
    """The tokenizer saved beside a checkpoint, or None if there is none. With the model's `vocab_size`, a
    tokenizer that makes ids the model has no embedding for is an error."""
    path = Path(path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{vocab_size}: the tokenizer files belong to another model. Copy the tokenizer files "
                         "of the model these weights came from into the directory")
    return tokenizer
