"""Atomic file writes: write a temporary file beside the target, fsync, rename over it.

A reader, or a run killed half-way, sees the old file or the new one, never half of one. Everything kosmos2
writes for a user (checkpoint files, shards, manifests, reports, drawings) goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], mode: int = 0o644
) -> Path:
    """Call `write(file)` on a temporary binary file beside `path`, fsync it, then rename it over `path`.

    The directory must exist. The file gets permissions `mode` (temporary files are created 0600).
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Persist a directory entry (a rename) where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
