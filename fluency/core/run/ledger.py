"""What fluency owns in a run folder: its marker and its ledger.

    RUN/.fluency-run      the marker, written first when a run starts: {"format": "fluency-run-folder",
                          "format_version", "created", "fluency_version"}. Only a folder with it is a run
                          whose files ``--overwrite`` may remove (a ``manifest.json`` alone is not enough).
    RUN/.fluency-ledger   one JSON string per line: the path (relative, POSIX) of every file fluency
                          writes in the folder, appended *before* the file is created (see
                          :func:`fluency.core.atomic.claim`), so the files of a failed or killed run are
                          known too; a path ending in ``/`` is a folder fluency owns with all it holds
                          (an activation store). ``fluency measure`` and ``fluency report`` append to it.

``--overwrite`` removes exactly the files in the ledger (and what interrupted atomic writes of them
left), never one a user added, then the folders that became empty. An entry that leaves the folder,
or passes through a symbolic link, is ignored. Names starting with ``.fluency-`` (marker, ledger,
lock) are fluency's bookkeeping, never a result.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from fluency.core.atomic import atomic_write_json, leftovers, recording
from fluency.core.errors import FluencyError
from fluency.core.version import FOLDER_FORMAT_VERSION, __version__

MARKER = ".fluency-run"
LEDGER = ".fluency-ledger"
FORMAT = "fluency-run-folder"


def bookkeeping(name: str) -> bool:
    """Whether a file name is fluency's bookkeeping (marker, ledger, lock, or a temporary copy of one)."""
    return name.startswith((".fluency-", "..fluency-"))


def results(folder: Path) -> list[Path]:
    """The entries of ``folder`` other than bookkeeping (none if it does not exist)."""
    return [p for p in folder.iterdir() if not bookkeeping(p.name)] if folder.is_dir() else []


def marker_version(folder: Path) -> int | None:
    """The format version of ``folder``'s marker; None without a valid marker."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    version = data.get("format_version") if isinstance(data, dict) and data.get("format") == FORMAT else None
    return version if isinstance(version, int) and version >= 1 else None


class Ledger:
    """The ledger of one run folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LEDGER
        self._known: set[str] | None = None

    def start(self) -> None:
        """Mark the folder as a fluency run (the marker first) and begin an empty ledger."""
        atomic_write_json(self.folder / MARKER, {"format": FORMAT, "format_version": FOLDER_FORMAT_VERSION,
                                                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                                 "fluency_version": __version__})
        self.path.write_bytes(b"")
        self._known = set()

    def entries(self) -> list[str]:
        """The recorded paths that stay inside the folder, in order (a torn last line is skipped)."""
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        found: dict[str, None] = {}
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, str) and _inside(entry):
                found[entry] = None
        return list(found)

    def record(self, path: Path, whole_folder: bool = False) -> None:
        """Append ``path`` (absolute, below the folder; ``whole_folder``: a folder owned with all it holds, written
        with a trailing ``/``) unless it is bookkeeping or already there."""
        rel = Path(os.path.relpath(path, os.path.abspath(self.folder))).as_posix() + ("/" if whole_folder else "")
        if self._known is None:
            self._known = set(self.entries())
        if rel in self._known or not _inside(rel) or any(rel.startswith(k) for k in self._known if k.endswith("/")):
            return  # known, outside, or inside a folder owned whole
        self._known.add(rel)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(rel) + "\n").encode("utf-8"))
        finally:
            os.close(fd)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """While inside, every file fluency writes below the folder is recorded before it is created."""
        with recording(self.folder, self.record):
            yield

    def remove_owned(self) -> None:
        """Delete every recorded file (and folder owned as a whole), the temporaries of interrupted writes of
        them, then the folders that became empty."""
        parents: set[Path] = set()
        for entry in self.entries():
            path = self.folder / entry
            if path.is_symlink() or not _real_folder(self.folder, path.parent):
                continue  # fluency writes no links, nor through them
            try:
                if entry.endswith("/") and path.is_dir():
                    shutil.rmtree(path)
                for file in [path, *leftovers(path)]:
                    if file.is_file() and not file.is_symlink():
                        file.unlink(missing_ok=True)
            except OSError as exc:
                raise FluencyError(f"--overwrite: cannot remove {path} ({exc.strerror or exc}); the new run did not "
                                   "start") from None
            parents.update(p for p in path.parents if self.folder in p.parents)
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()  # only if empty: a folder holding a user's file stays
            except OSError:
                pass


def _inside(entry: str) -> bool:
    """Whether a ledger entry names a path strictly inside the folder (relative, no ``..``)."""
    path = PurePosixPath(entry)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts and not bookkeeping(path.name)


def _real_folder(root: Path, folder: Path) -> bool:
    """Whether ``folder`` (below ``root``) is reached through real folders only, no symbolic link."""
    while folder != root:
        if folder.is_symlink() or not folder.is_dir() or folder == folder.parent:
            return False
        folder = folder.parent
    return True


def remove_if_unused(folder: Path) -> None:
    """Remove ``folder`` if it holds nothing but bookkeeping and empty folders (a failed first write)."""
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    if folder.is_dir() and not results(folder):
        try:
            for p in folder.iterdir():
                p.unlink(missing_ok=True)
            folder.rmdir()
        except OSError:
            pass
