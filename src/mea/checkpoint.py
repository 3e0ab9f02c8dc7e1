"""Saving and loading Hugging Face checkpoints safely: atomic directory writes, safetensors only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .atomic import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local causal-LM checkpoint directory (safetensors weights; never runs checkpoint code)."""
    import mea  # noqa: F401  (registers model_type "mea")

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint directory (expected config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except ValueError:
        raise
    except Exception as e:  # missing or corrupt weights surface as OSError, SafetensorError, KeyError, ...
        raise ValueError(f"could not load the model in {path}: {type(e).__name__}: {e}") from e


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
    return out


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> None:
    """Fail before any work if `out` would be clobbered."""
    if Path(out).exists() and not overwrite:
        raise ValueError(f"{out} already exists; choose another output directory or pass --overwrite")


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a checkpoint, or None if there is none."""
    path = Path(path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(path)
