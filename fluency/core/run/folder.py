"""A run folder: where it is, what it holds (:class:`RunResult`), its manifest, and the versions it records.

A run folder is recognised by its ``manifest.json`` (``format: fluency-run``; a version-1 manifest
has no format field). ``format_version`` 2 added ``config`` (the :class:`RunConfig`),
``metric_parts`` and ``stores``; readers accept every earlier version and refuse a newer one.
"""

from __future__ import annotations

import json
import platform
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fluency.core.atomic import atomic_write_json
from fluency.core.errors import FluencyError
from fluency.core.inputs.ratings import MatchReport
from fluency.core.plugin.analysis import EffectSize
from fluency.core.plugin.manager import PluginManager, plugin_version
from fluency.core.run.analyse import read_effects
from fluency.core.version import MANIFEST_FORMAT_VERSION, __version__

MANIFEST = "manifest.json"
FORMAT = "fluency-run"
#: what a run writes, removed by --overwrite before a new run writes them again
OUTPUT_FOLDERS = ("activations", "analyses", "state", "figures", "latents", "metrics")
OUTPUT_FILES = ("metrics.parquet", "metrics.parquet.partial", "ratings.parquet", "report.html")


@dataclass
class RunResult:
    """What a run produced: its folder, the metric table and one table per analysis."""

    path: Path
    metrics: pd.DataFrame
    analyses: dict[str, pd.DataFrame] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    report: MatchReport | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # image path (relative) -> why it was skipped

    def effects(self) -> dict[tuple[str, str], EffectSize]:
        """``{(analysis, statistic): EffectSize}``: how each analysis declared its statistics are shown."""
        return read_effects(self.manifest, list(self.analyses))

    def results(self) -> pd.DataFrame:
        """Every analysis row with ``kind``, the declared kind of its statistic (None: undeclared), strongest
        first within a kind (smallest FDR-corrected p, then largest |estimate|)."""
        if not self.analyses:
            return pd.DataFrame()
        effects = self.effects()
        table = pd.concat(self.analyses.values(), ignore_index=True)
        kinds = [getattr(effects.get((a, str(s))), "kind", None) for a, s in zip(table["analysis"], table["statistic"])]
        table = table.assign(kind=kinds, _abs=table["estimate"].abs())
        table = table.sort_values(["p_fdr", "_abs"], ascending=[True, False], na_position="last")
        return table.drop(columns="_abs").reset_index(drop=True)

    def strongest(self, top: int | None = 10) -> pd.DataFrame:
        """The correlations (every statistic declared ``kind="correlation"``), strongest first: the comparable
        effect sizes that the summary ranks. With ``top``, the ``top`` strongest rows plus the strongest row
        of every metric not among them, so that no metric disappears from the summary."""
        table = self.results()
        if not len(table):
            return table
        return _top(table[table["kind"] == "correlation"].reset_index(drop=True), top)

    def sections(self, top: int | None = 5) -> dict[str, pd.DataFrame]:
        """The other declared effect sizes, one table per kind (coefficient, r2, difference, descriptive),
        strongest first, at most ``top`` rows each: they are not comparable with correlations."""
        table = self.results()
        if not len(table):
            return {}
        kinds = [k for k in ("coefficient", "r2", "difference", "descriptive") if (table["kind"] == k).any()]
        return {k: table[table["kind"] == k].reset_index(drop=True).head(top if top is not None else None)
                for k in kinds}


def _top(table: pd.DataFrame, top: int | None) -> pd.DataFrame:
    """The ``top`` first rows plus the first row of every metric not among them."""
    if top is None:
        return table
    keep = set(table.index[:top]) | set(table.drop_duplicates("metric").index)
    return table.loc[sorted(keep)].reset_index(drop=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{secrets.token_hex(3)}"


def prepare_out(out: str | Path | None, overwrite: bool) -> Path:
    path = Path(out) if out is not None else new_run_dir()
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FluencyError(f"--out {path}: the folder exists and is not empty; choose another or pass --overwrite")
        if not (path / MANIFEST).exists():
            raise FluencyError(f"--out {path}: refusing to overwrite a folder that is not a fluency run")
        for name in OUTPUT_FOLDERS:  # no stale table may survive
            shutil.rmtree(path / name, ignore_errors=True)
        for name in OUTPUT_FILES:
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """A run folder's manifest; one line if it is missing, unreadable or of a newer format."""
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FluencyError(f"{run_dir}: not a fluency run folder (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FluencyError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict):
        raise FluencyError(f"{path}: not a fluency manifest")
    version = manifest.get("format_version", 1)
    if manifest.get("format", FORMAT) != FORMAT or not isinstance(version, int) or version < 1:
        raise FluencyError(f"{path}: not a fluency run manifest (format {manifest.get('format')!r})")
    if version > MANIFEST_FORMAT_VERSION:
        raise FluencyError(f"{path} has format version {version}, newer than this fluency reads "
                           f"(1 to {MANIFEST_FORMAT_VERSION}): upgrade fluency")
    return manifest


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(run_dir / MANIFEST, {"format": FORMAT, "format_version": MANIFEST_FORMAT_VERSION, **manifest})


def outputs(run_dir: Path) -> list[str]:
    """Every file in the run folder, relative and sorted (the manifest's ``outputs``)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def versions(manager: PluginManager, used: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """fluency's, Python's, the main libraries' and every used plugin's version."""
    import pyarrow
    import scipy

    return {"fluency": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
            "scipy": scipy.__version__, "platform": platform.platform(),
            "plugins": {f"{k}.{n}": plugin_version(manager, k, n) for k, n in used}}


class RunRecord:
    """The manifest of a run being made: the one place its steps record into, written at each stage.

    Steps call its methods instead of editing a dict handed to them, so what a run records is found by
    reading the calls on this object.
    """

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.data: dict[str, Any] = {**data, "timings": dict(data.get("timings") or {})}

    def set(self, **values: Any) -> None:
        self.data.update(values)

    def entry(self, key: str, name: str, value: Any) -> None:
        """``data[key][name] = value`` (for per-checkpoint tables: stores, figures)."""
        self.data.setdefault(key, {})[name] = value

    def timing(self, name: str, seconds: float) -> None:
        self.data["timings"][name] = round(seconds, 3)

    def write(self) -> None:
        write_manifest(self.run_dir, self.data)

    def failed(self, exc: BaseException, seconds: float) -> None:
        """Record why the run stopped (``interrupted`` for Ctrl-C) and write it."""
        import traceback

        self.set(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                 error="".join(traceback.format_exception_only(type(exc), exc)).strip())
        self.timing("total", seconds)
        self.write()
