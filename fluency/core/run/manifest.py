"""Reading a run folder's ``manifest.json`` without torch: what ``fluency runs`` and ``fluency query`` need.

A manifest says ``format: fluency-run``; ``format_version`` 2 added ``config``, ``metric_parts`` and
``stores``; readers accept every earlier version and refuse a newer one. A version-1 manifest has no
format field and is recognised by its keys (:data:`V1_KEYS`). :mod:`fluency.core.run.folder` (which
writes run folders and imports torch) re-exports these names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fluency.core.errors import FluencyError
from fluency.core.run.lock import read_holder
from fluency.core.version import MANIFEST_FORMAT_VERSION

MANIFEST = "manifest.json"
FORMAT = "fluency-run"
#: the keys every version-1 manifest has (it has no format field)
V1_KEYS = frozenset({"run_id", "status", "started", "inputs", "metrics", "versions"})


class NotARunFolder(FluencyError):
    """The folder has no manifest, or a ``manifest.json`` that is not a fluency run's (another tool's file)."""


def run_status(run_dir: Path, manifest: Mapping[str, Any]) -> tuple[str, str]:
    """``(status, note)``: the manifest's status, except that a run still marked ``running`` whose process is gone
    (killed: no live lock) reads ``incomplete``, the note saying why."""
    status = str(manifest.get("status", "unknown"))
    if status != "running":
        return status, ""
    holder = read_holder(run_dir)
    why = "it holds no lock" if holder is None else holder.gone()
    if holder is not None and why is None:
        return status, f"by {holder.describe()}"
    return "incomplete", f"the process that wrote it is gone ({why})"


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """A run folder's manifest; one line if it is missing (:class:`NotARunFolder`), unreadable or of a newer
    format."""
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotARunFolder(f"{run_dir}: not a fluency run folder (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FluencyError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict):
        raise FluencyError(f"{path}: not a fluency manifest")
    version = manifest.get("format_version", 1)
    v1 = "format" not in manifest and V1_KEYS <= manifest.keys()
    if not (v1 or manifest.get("format") == FORMAT) or not isinstance(version, int) or version < 1:
        raise NotARunFolder(f"{path}: not a fluency run manifest (format {manifest.get('format')!r}), so "
                            f"{run_dir} is not a fluency run folder")
    if version > MANIFEST_FORMAT_VERSION:
        raise FluencyError(f"{path} has format version {version}, newer than this fluency reads "
                           f"(1 to {MANIFEST_FORMAT_VERSION}): upgrade fluency")
    return manifest
