"""Atomic writes, fsync, folder replace, disk errors: for any module that writes files others read.

A reader (a resumed run, a report, a user) sees the old file or folder or the new one, never half of
one; a write that fails names the file and, for a full disk, what to do. Only the standard library and
errors.py: modules that write need not import the run folder's manager (checkpoint.py) or torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from scalelora.errors import CheckpointError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file + fsync + rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise_disk_error(path, err)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, compact: bool = False) -> None:
    """`data` as JSON, indented (or `compact`: one line, for large lists such as per-text predictions)."""
    layout = {"separators": (",", ":")} if compact else {"indent": 2}
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, **layout) + "\n")


def raise_disk_error(path: Path, err: OSError) -> None:
    """Raise CheckpointError naming the file being written (err.filename when known, else `path`)."""
    where = err.filename or path
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CheckpointError(
            f"no space left on the device while writing {where}; free space there and resume with resume=auto"
        ) from None
    raise CheckpointError(f"cannot write {where}: {err.strerror or err}") from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
