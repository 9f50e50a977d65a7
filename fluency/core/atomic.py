"""Atomic file writes: write a temporary file beside the target, fsync, rename.

A reader (or a crash) never sees a half-written file: the target either keeps its
old content or has the complete new one.

Every file written here is first *claimed* (:func:`claim`): while a folder is being recorded
(:func:`recording`, how a run folder's ledger learns what fluency wrote there), a file about to be
written below it is reported before it exists, so even a killed writer's files are known. Writers
that stream into a file themselves (Parquet ``.partial`` files) call :func:`claim` before opening it.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fluency.core.errors import FluencyError, StorageFullError

#: (folder path ending in a separator, callback) of every folder being recorded
_RECORDING: list[tuple[str, Callable[[Path, bool], None]]] = []


def claim(path: str | Path, whole_folder: bool = False) -> None:
    """Report that fluency is about to write the file ``path`` (``whole_folder``: the folder ``path`` and all it
    will hold) to the recorder of any folder it lies in."""
    if _RECORDING:
        full = os.path.abspath(path)
        for folder, record in tuple(_RECORDING):
            if full.startswith(folder):
                record(Path(full), whole_folder)


@contextmanager
def recording(folder: str | Path, record: Callable[[Path, bool], None]) -> Iterator[None]:
    """While inside, call ``record(absolute path, whole_folder)`` before anything below ``folder`` is written."""
    entry = (os.path.join(os.path.abspath(folder), ""), record)
    _RECORDING.append(entry)
    try:
        yield
    finally:
        _RECORDING.remove(entry)


#: the errors of a full disk, a file-size limit (RLIMIT_FSIZE) and a full quota
FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
#: the errors of a folder fluency may not write: read-only file system, no permission
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def storage_guard(path: str | Path) -> Iterator[None]:
    """Turn a full disk (or a file-size or quota limit) while writing ``path`` into one
    :class:`StorageFullError` naming the file and how much of it was written, and a read-only or forbidden
    place into one :class:`FluencyError` naming it; other errors pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno in READ_ONLY:
            raise FluencyError(f"cannot write {path}: {os.strerror(exc.errno)}; fluency needs a folder it may "
                               "write (choose another --out, or change the folder's permissions)") from None
        if exc.errno not in FULL:
            raise
        size = _size(path)
        raise StorageFullError(
            f"{path}: the disk is full (or a file-size or quota limit was reached: {os.strerror(exc.errno)}) after "
            f"{size:,} bytes of it were written; the unfinished file is not used, finished results are kept. "
            "Free some space and run again (--no-store or --store-layers write less)") from None


def _size(path: str | Path) -> int:
    """Bytes of ``path`` or of its ``.partial``/temporary file, whichever exists (0 if none)."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".partial"), *leftovers(path)):
        try:
            return candidate.stat().st_size
        except OSError:
            continue
    return 0


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


def leftovers(path: str | Path) -> list[Path]:
    """The temporary files that interrupted atomic writes of ``path`` left beside it."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))


def publish(partial: str | Path, path: str | Path) -> None:
    """Make a finished ``partial`` file durable and rename it onto ``path`` (the rename made durable too):
    how a writer that streams into ``NAME.partial`` says it is complete."""
    claim(path)
    with storage_guard(path):
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
    claim(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with storage_guard(path):
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
