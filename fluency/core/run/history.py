"""The fluency runs below a folder, one :class:`RunInfo` each, read from their manifests without torch.

``fluency runs`` lists them and ``fluency query`` turns them into its ``runs`` view. A run folder is a
folder whose ``manifest.json`` is a fluency run's; its sub-folders are not searched, nor are hidden
folders (``.git``, ``.venv``). A folder that cannot be read or a broken manifest gives a note, and the
other runs are still found; another tool's ``manifest.json`` is not a run and gives none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

from fluency.core.errors import FluencyError
from fluency.core.run.manifest import MANIFEST, NotARunFolder, read_manifest, run_status


@dataclass(frozen=True)
class RunInfo:
    """One run as its manifest describes it; ``run_dir`` is relative to the folder searched."""

    run_dir: str
    run_id: str | None
    started: str | None  # ISO 8601 with the UTC offset, as the manifest records it
    finished: str | None
    status: str  # the manifest's, except a killed "running" run reads "incomplete"
    status_note: str
    stimuli: str  # a short description: "embedded", the images' folder, or the ratings file
    images: int | None
    checkpoints: list[str]  # labels, in the run's order
    checkpoint_sha256: list[str | None]
    metrics: list[str]
    analyses: list[str]
    fluency_version: str | None
    path: Path = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The record without the absolute path, JSON-ready."""
        record = asdict(self)
        del record["path"]
        return record


@dataclass
class Found:
    """The runs below a folder (newest first) and one note per folder or manifest that could not be read."""

    runs: list[RunInfo]
    notes: list[str]


def find_runs(root: Path) -> Found:
    """Every fluency run below ``root`` (``root`` itself included), newest first; one line if ``root`` is not
    a folder."""
    if not root.is_dir():
        raise FluencyError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    runs: list[RunInfo] = []
    notes: list[str] = []

    def unreadable(exc: OSError) -> None:
        notes.append(f"{exc.filename or root}: not readable ({exc.strerror or exc}); its runs are not listed")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MANIFEST not in files:
            continue
        try:
            manifest = read_manifest(here)
        except NotARunFolder:
            continue
        except FluencyError as exc:
            notes.append(str(exc))
            dirs[:] = []
            continue
        runs.append(describe_run(here, _relative(here, root), manifest))
        dirs[:] = []  # a run's own folders (activations, figures) hold no runs
    runs.sort(key=_newest_first)
    return Found(runs, notes)


def describe_run(path: Path, run_dir: str, manifest: Mapping[str, Any]) -> RunInfo:
    """The :class:`RunInfo` of the run at ``path`` (a manifest of any shape: wrong types read as unknown)."""
    status, note = run_status(path, manifest)
    inputs = _mapping(manifest.get("inputs"))
    stimuli = _mapping(inputs.get("stimuli"))
    checkpoints = [c for c in _list(inputs.get("checkpoints")) if isinstance(c, Mapping)]
    images = stimuli.get("n_images")
    return RunInfo(
        run_dir=run_dir, run_id=_text(manifest.get("run_id")), started=_text(manifest.get("started")),
        finished=_text(manifest.get("finished")), status=status, status_note=note,
        stimuli=describe_stimuli(stimuli), images=images if isinstance(images, int) else None,
        checkpoints=[_text(c.get("label")) or "?" for c in checkpoints],
        checkpoint_sha256=[_text(c.get("sha256")) for c in checkpoints],
        metrics=[str(m) for m in _list(manifest.get("metrics"))],
        analyses=[str(a) for a in _list(manifest.get("analyses"))],
        fluency_version=_text(_mapping(manifest.get("versions")).get("fluency")), path=path)


def describe_stimuli(stimuli: Mapping[str, Any]) -> str:
    """A few words for the stimulus set: ``embedded``, the images' folder (its last two parts), the ratings file
    of a measured store, else its kind or ``?``."""
    if stimuli.get("kind") == "embedded":
        return "embedded"
    for key in ("images", "root"):
        if isinstance(stimuli.get(key), str):
            return "/".join(PurePath(stimuli[key]).parts[-2:])
    if isinstance(stimuli.get("ratings"), str):
        return f"ratings {PurePath(stimuli['ratings']).name}"
    return _text(stimuli.get("kind")) or "?"


def started_at(text: str | None) -> datetime | None:
    """The time an ISO 8601 text names (one without an offset is UTC); None if it is not one."""
    try:
        moment = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment and moment.tzinfo is None else moment


def _newest_first(info: RunInfo) -> tuple[bool, float, str]:
    moment = started_at(info.started)
    return moment is None, -moment.timestamp() if moment else 0.0, info.run_dir


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return None if value is None or isinstance(value, (dict, list)) else str(value)
