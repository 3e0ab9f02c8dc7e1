"""Reading the files a study's runs leave behind. A missing file means the step has not run yet; a file
that exists but cannot be read is an error naming the file, never taken for "missing"."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path, *, fix: str) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist. `fix`: what the user should do
    when it is corrupt (part of the error message)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt (not valid JSON: {e}); {fix}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is corrupt (a JSON {type(obj).__name__}, not an object); {fix}")
    return obj


def read_jsonl(path: Path, *, fix: str) -> tuple[list[dict], bool]:
    """(records, cut): the JSON objects of `path`, one a line ([] when it does not exist). A last line
    without its newline that does not parse is an append cut short (the writer was killed or is still
    writing): it is dropped and `cut` is True. Any other unreadable line is an error naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], False
    lines = text.split("\n")  # the last element is "" when the file ends with a newline
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                return records, True
            raise ValueError(f"{path} is corrupt at line {i} ({e}); {fix}") from e
    return records, False
