"""Progress lines for people: on stderr, flushed, so that stdout stays the command's JSON result."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
