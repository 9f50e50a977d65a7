"""A run folder: where it is, what it holds (:class:`RunResult`), its manifest, and the versions it records.

A run folder carries fluency's marker ``.fluency-run`` and the ledger of the files fluency wrote
there (:mod:`fluency.core.run.ledger`); whoever writes it holds its lock (:mod:`fluency.core.run.lock`).
Its ``manifest.json`` says ``format: fluency-run``; ``format_version`` 2 added ``config`` (the
:class:`RunConfig`), ``metric_parts`` and ``stores``; readers accept every earlier version and refuse
a newer one. A version-1 manifest has no format field and is recognised by its keys
(:data:`V1_KEYS`); reading it needs no torch (:mod:`fluency.core.run.manifest`). Runs written before the marker existed are read (report, measure) but never
overwritten: without a ledger their files cannot be told from a user's.
"""

from __future__ import annotations

import platform
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from fluency.core.atomic import atomic_write_json
from fluency.core.errors import FluencyError, Terminated
from fluency.core.inputs.ratings import MatchReport
from fluency.core.plugin.analysis import EffectSize
from fluency.core.plugin.manager import PluginManager, plugin_version
from fluency.core.run.analyse import read_effects
from fluency.core.run.ledger import MARKER, Ledger, bookkeeping, marker_version, results
from fluency.core.run.lock import FolderLock, refuse_if_busy
# reading a manifest needs no torch: it lives in .manifest (fluency runs, fluency query), re-exported here
from fluency.core.run.manifest import FORMAT as FORMAT, MANIFEST as MANIFEST, V1_KEYS as V1_KEYS
from fluency.core.run.manifest import read_manifest as read_manifest, run_status as run_status
from fluency.core.run.replicates import aggregate
from fluency.core.run.tables import MERGED, count_metric_rows, read_metric_table
from fluency.core.version import FOLDER_FORMAT_VERSION, MANIFEST_FORMAT_VERSION, __version__



class _ReadOnFirstUse:
    """A dataclass field holding a DataFrame that, when None, is read from the run folder on first access:
    a run of 100,000 images does not keep its long metric table in memory for a caller who never asks."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = f"_{name}"

    def __get__(self, obj: RunResult | None, owner: type | None = None) -> pd.DataFrame | None:
        if obj is None:
            return None  # the dataclass default
        if getattr(obj, self.attribute) is None:
            setattr(obj, self.attribute, read_metric_table(obj.path / MERGED))
        return getattr(obj, self.attribute)

    def __set__(self, obj: RunResult, value: pd.DataFrame | None) -> None:
        setattr(obj, self.attribute, value)


@dataclass
class RunResult:
    """What a run produced: its folder, the metric table (``metrics``: read from ``metrics.parquet`` on first
    use when not given) and one table per analysis."""

    path: Path
    metrics: pd.DataFrame = _ReadOnFirstUse()  # type: ignore[assignment]
    analyses: dict[str, pd.DataFrame] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    report: MatchReport | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # image path (relative) -> why it was skipped

    def metric_counts(self) -> tuple[int, int]:
        """(values, distinct images) of the metric table, read from its ``image_id`` column alone unless the
        table is already in memory."""
        if getattr(self, "_metrics", None) is not None:
            return len(self.metrics), int(self.metrics["image_id"].nunique())
        return count_metric_rows(self.path / MERGED)

    def effects(self) -> dict[tuple[str, str], EffectSize]:
        """``{(analysis, statistic): EffectSize}``: how each analysis declared its statistics are shown."""
        return read_effects(self.manifest, list(self.analyses))

    def replicates(self) -> pd.DataFrame:
        """Every test aggregated over the replicate models of each configuration (mean, SD, min, max).

        Replicates are two or more checkpoints trained from different seeds of one configuration; see
        :func:`fluency.core.run.replicates.aggregate`."""
        return aggregate(self.analyses, self.manifest, self.effects())

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

    def strongest(self, top: int | None = 10, every_metric: bool = False) -> pd.DataFrame:
        """The correlations (every statistic declared ``kind="correlation"``), strongest first: the comparable
        effect sizes that the summary ranks; the ``top`` strongest rows (all with None), and with
        ``every_metric`` also the strongest row of every metric not among them. A row that repeats another
        output's test (``same_as``) is left out: one hypothesis, one row."""
        table = _once(self.results())
        if not len(table):
            return table
        return _top(table[table["kind"] == "correlation"].reset_index(drop=True), top, every_metric)

    def sections(self, top: int | None = 5) -> dict[str, pd.DataFrame]:
        """The other declared effect sizes, one table per kind (coefficient, r2, difference, descriptive),
        strongest first, at most ``top`` rows each: they are not comparable with correlations. Without the
        rows that repeat another output's test (``same_as``)."""
        table = _once(self.results())
        if not len(table):
            return {}
        kinds = [k for k in ("coefficient", "r2", "difference", "descriptive") if (table["kind"] == k).any()]
        return {k: table[table["kind"] == k].reset_index(drop=True).head(top if top is not None else None)
                for k in kinds}


def _once(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that are not a repeat of another output's test (:mod:`fluency.core.run.same_tests`)."""
    if "same_as" not in table.columns:
        return table
    return table[~table["same_as"].fillna("").astype(str).str.len().gt(0)].reset_index(drop=True)


def _top(table: pd.DataFrame, top: int | None, every_metric: bool) -> pd.DataFrame:
    """The ``top`` first rows (``every_metric``: plus the first row of every metric not among them)."""
    if top is None:
        return table
    keep = set(table.index[:top]) | (set(table.drop_duplicates("metric").index) if every_metric else set())
    return table.loc[sorted(keep)].reset_index(drop=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{secrets.token_hex(3)}"


@contextmanager
def run_folder(out: str | Path | None, overwrite: bool, command: str,
               console: Console | None = None, resume: bool = False) -> Iterator[Path]:
    """The folder a new run writes (``out``, default a new one under ``runs/``), locked and marked, its ledger
    recording. An existing folder must be empty or, with ``overwrite``, a fluency run: the files its ledger
    lists are removed here, under the lock, after the new run was validated; a user's files stay. ``resume``:
    the folder holds the run this one continues (its files and ledger stay)."""
    path = Path(out) if out is not None else new_run_dir()
    if path.exists() and not path.is_dir():
        raise FluencyError(f"--out {path}: a file, not a folder")
    refuse_if_busy(path)
    if not resume:
        _previous_run(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    with FolderLock(path, command, console):
        ledger = Ledger(path)
        if not resume:
            if _previous_run(path, overwrite):  # checked again, now that no one else writes
                ledger.remove_owned()
            ledger.start()
        with ledger.recording():
            yield path


def _previous_run(path: Path, overwrite: bool) -> bool:
    """Whether ``path`` holds a fluency run to overwrite; False if it is empty; one line if it may not be used."""
    if not results(path):
        return False
    if not overwrite:
        raise FluencyError(f"--out {path}: the folder exists and is not empty; choose another or pass --overwrite")
    version = marker_version(path)
    if version is not None and version > FOLDER_FORMAT_VERSION:
        raise FluencyError(f"--out {path}: a run of a newer fluency (folder format {version}); upgrade fluency or "
                           "choose another --out")
    if version is not None:
        return True
    try:
        read_manifest(path)
    except FluencyError:
        raise FluencyError(f"--out {path}: refusing to overwrite a folder that is not a fluency run (it has no "
                           f"{MARKER} marker)") from None
    raise FluencyError(f"--out {path}: a run of an earlier fluency, which kept no ledger of its files: --overwrite "
                       "cannot tell them from yours; choose another --out, or remove the folder yourself")


@contextmanager
def writing(folder: Path, command: str, console: Console | None = None, *, new: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock and record what is written there in its ledger (``new``: mark it as a new run
    folder first). A run of an earlier fluency, without a marker, gets no ledger: it stays unoverwritable."""
    with FolderLock(folder, command, console):
        ledger = Ledger(folder)
        if new:
            ledger.start()
        with ledger.recording() if new or marker_version(folder) is not None else nullcontext():
            yield


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(run_dir / MANIFEST, {"format": FORMAT, "format_version": MANIFEST_FORMAT_VERSION, **manifest})


def outputs(run_dir: Path) -> list[str]:
    """Every file in the run folder but fluency's bookkeeping, relative and sorted (the manifest's ``outputs``)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and not bookkeeping(p.name))


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
        """Record why the run stopped (``interrupted`` for Ctrl-C and SIGTERM) and write it."""
        import traceback

        if isinstance(exc, KeyboardInterrupt):
            signal = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
            self.set(status="interrupted", error=f"interrupted by {signal}")
        else:
            self.set(status="failed", error="".join(traceback.format_exception_only(type(exc), exc)).strip())
        self.timing("total", seconds)
        self.write()
