"""One writer at a time in a folder: ``FOLDER/.fluency-lock``, and a dead writer recognised.

The lock is a small JSON file naming its holder: ``host``, ``pid``, ``command``, ``started`` and a
``heartbeat`` (UTC, ISO 8601) that a daemon thread refreshes every :data:`HEARTBEAT` seconds while
the holder works. ``fluency run``, ``measure``, ``report`` and ``store import`` take it on the folder
they write. A second writer is refused with one line while the holder is alive; a lock whose process
is gone on this host, or whose heartbeat is older than :data:`STALE` seconds (a killed, frozen or
remote writer), is stale: it is taken over with a note. The same test tells a run that was killed
(its manifest still says ``running``) from one that is running.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape

from fluency.core.errors import FluencyError

LOCK = ".fluency-lock"
#: seconds between heartbeats
HEARTBEAT = 15.0
#: a heartbeat older than this (seconds) means the holder is no longer working
STALE = 120.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (ended, not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return True


@dataclass(frozen=True)
class Holder:
    """Who holds a folder's lock, as its lock file says."""

    host: str
    pid: int
    command: str
    started: str
    heartbeat: str
    token: str = ""

    def gone(self) -> str | None:
        """Why the holder no longer works (its process is gone, its heartbeat stopped), or None while alive."""
        if self.host == socket.gethostname() and not pid_alive(self.pid):
            return f"its process {self.pid} on {self.host} is gone"
        try:
            age = (_now() - datetime.fromisoformat(self.heartbeat)).total_seconds()
        except (TypeError, ValueError):
            return "its lock file is unreadable"
        return f"its heartbeat stopped {age:.0f} s ago" if age > STALE else None

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid} on {self.host}, since {self.started})"


def read_holder(folder: str | Path) -> Holder | None:
    """The holder of ``folder``'s lock; None without one (an unreadable lock reads as a holder that is gone)."""
    try:
        data: Any = json.loads((Path(folder) / LOCK).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = {}
    data = data if isinstance(data, dict) else {}
    try:
        pid = int(data.get("pid", 0))
    except (TypeError, ValueError):
        pid = 0
    return Holder(str(data.get("host", "?")), pid, str(data.get("command", "a fluency command")),
                  str(data.get("started", "?")), str(data.get("heartbeat", "")), str(data.get("token", "")))


def refuse_if_busy(folder: Path) -> None:
    """One line if a live holder has ``folder``'s lock (a check before anything is written)."""
    holder = read_holder(folder)
    if holder is not None and holder.gone() is None:
        raise FluencyError(f"{folder} is in use by {holder.describe()}: wait until it ends, or choose another "
                           "folder")


class FolderLock:
    """``with FolderLock(folder, "fluency run"):`` holds ``folder``'s lock (the folder must exist)."""

    def __init__(self, folder: str | Path, command: str, console: Console | None = None) -> None:
        self.folder, self.path, self.command = Path(folder), Path(folder) / LOCK, command
        self.console = console or Console(stderr=True)
        self.token = secrets.token_hex(8)
        self.started = _now().isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _content(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                           "started": self.started, "heartbeat": _now().isoformat(timespec="seconds"),
                           "token": self.token}).encode()

    def acquire(self) -> None:
        """Create the lock, taking over a stale one with a note; one line if a live holder has it."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_holder(self.folder)
                why = holder.gone() if holder is not None else "gone"
                if holder is not None and why is None:
                    raise FluencyError(f"{self.folder} is in use by {holder.describe()}: wait until it ends, or "
                                       "choose another folder") from None
                if holder is not None and read_holder(self.folder) == holder:  # unchanged: nobody took it meanwhile
                    self.console.print(f"[yellow]note:[/yellow] taking over the stale lock of "
                                       f"{escape(holder.describe())} on {escape(str(self.folder))}: {escape(str(why))}",
                                       highlight=False)
                    self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise FluencyError(f"{self.folder}: cannot write its lock file ({exc.strerror or exc})") from None
            try:
                os.write(fd, self._content())
            finally:
                os.close(fd)
            self._beating = threading.Thread(target=self._beat, name=f"fluency-lock {self.folder}", daemon=True)
            self._beating.start()
            return
        raise FluencyError(f"{self.folder}: could not take its lock (other fluency commands keep taking it)")

    def _mine(self) -> bool:
        holder = read_holder(self.folder)
        return holder is not None and holder.token == self.token

    def _beat(self) -> None:
        """Refresh the heartbeat until released; stop if another writer took the lock over."""
        while not self._stop.wait(HEARTBEAT):
            if not self._mine():
                return
            tmp = self.path.with_name(f"{LOCK}.{self.token}")
            try:
                tmp.write_bytes(self._content())
                os.replace(tmp, self.path)
            except OSError:
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (if it is still this one's)."""
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        if self._mine():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
