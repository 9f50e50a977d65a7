"""Atomic file writes: write a temporary file beside the target, fsync, rename.

A reader (or a crash) never sees a half-written file: the target either keeps its
old content or has the complete new one.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Persist the entries (renames) of folder ``path``; a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def publish(partial: str | Path, path: str | Path) -> None:
    """Make a finished ``partial`` file durable and rename it onto ``path`` (the rename made durable too):
    how a writer that streams into ``NAME.partial`` says it is complete."""
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write.

    On success the file is fsynced and renamed onto ``path``; on an exception it is
    removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON atomically (unknown types via ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
