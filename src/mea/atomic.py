"""Atomic writes: a reader sees the old file (or directory) or the complete new one, never half of one.

New content is written beside its final name under a hidden `.NAME.tmp-PID-...` name and renamed into
place. A writer killed before the rename leaves only such a hidden entry; the next write of NAME removes
the ones whose process is gone. A full disk surfaces as a `ValueError` that names the directory and says
what to do; whatever was there before is left as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    try:
        with disk_full_as_value_error(path), os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh directory beside `path`; when the block succeeds it replaces `path` (a reader sees the
    old directory or the complete new one, at every moment); when it fails it is removed and `path` is
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        with disk_full_as_value_error(path):
            yield tmp
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old directory
            return
        if path.exists():  # no atomic swap here: move the old one aside first (path is briefly absent)
            aside = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
            os.replace(path, aside / path.name)
            os.replace(tmp, path)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: str | Path) -> None:
    """Delete a directory so that it disappears at once (renamed to a hidden name, then removed): a kill
    midway leaves a stale hidden entry, never a half-deleted `path`."""
    path = Path(path)
    remove_stale(path)
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(path: str | Path) -> None:
    """Remove the hidden temporaries of `path` left by writers that were killed (their process is gone)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(_tmp_prefix(path, pid="*") + "*"):
        pid = entry.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def is_temporary(name: str) -> bool:
    """Whether a directory entry is one of our hidden temporaries."""
    return name.startswith(".") and ".tmp-" in name


def _tmp_prefix(path: Path, pid: int | str | None = None) -> str:
    return f".{path.name}.tmp-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _is_disk_full(e: BaseException, where: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e) or "os error 28" in str(e):
        return True
    # some writers (torch.save to a path) report a full disk only as a short write
    try:
        return isinstance(e, (OSError, RuntimeError)) and shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_as_value_error(path: Path):
    """Turn a full disk while writing `path` into a ValueError that says so and what to do."""
    path = Path(path)
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e, path.parent):
            raise
        raise ValueError(f"no space left on the device holding {path.parent} while writing {path.name}; "
                         f"nothing already saved there was changed. Free some space (see `df -h {path.parent}`) "
                         "and run the same command again") from e
