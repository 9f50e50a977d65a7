"""The long metric table, written in parts, one per metric plugin and option set.

A run folder holds::

    metrics/<plugin>-<options hash>.parquet   one part per metric plugin (and option set) of the run
    metrics.parquet                           every part merged: the table users read

Each row is ``image_id, checkpoint, metric, layer, value, run_id, plugin, plugin_version,
options_hash`` (``layer`` null for whole-model metrics), so pandas, polars, DuckDB and R read it
alike and batch evaluation or SQL can tell parts apart; the options themselves are in the run's
manifest under ``metric_parts``. A part is written as ``.partial`` and renamed when complete: an
interrupted part keeps its rows and is never mistaken for a finished one.

Format versions (Parquet schema metadata ``fluency_format`` / ``format_version``): 1 had the first
six columns only and no metadata; it is read with the last three columns null. A newer version
than this fluency knows is refused with one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fluency.core.atomic import atomic_path, claim, publish, storage_guard
from fluency.core.errors import StorageFullError, StoreError
from fluency.core.memory import release_memory
from fluency.core.plugin.metric_columns import LONG_COLUMNS, ColumnsBuilder, MetricColumns
from fluency.core.version import METRIC_TABLE_FORMAT_VERSION as FORMAT_VERSION

FORMAT = "fluency-metric-table"
PARTS_DIR = "metrics"
MERGED = "metrics.parquet"
_ROW_FIELDS = [("image_id", pa.string()), ("checkpoint", pa.string()), ("metric", pa.string()),
               ("layer", pa.string()), ("value", pa.float64()), ("run_id", pa.string())]
_PART_FIELDS = [("plugin", pa.string()), ("plugin_version", pa.string()), ("options_hash", pa.string())]
METRIC_SCHEMA = pa.schema(_ROW_FIELDS + _PART_FIELDS,
                          metadata={b"fluency_format": FORMAT.encode(), b"format_version": str(FORMAT_VERSION).encode()})


def part_name(plugin: str, options_hash: str) -> str:
    """The file name of a metric part, relative to the run folder."""
    return f"{PARTS_DIR}/{plugin}-{options_hash}.parquet"


class MetricTableWriter:
    """Write one metric part incrementally to ``PATH.partial``; ``close()`` renames it into place.

    Every row carries ``run_id`` and the part's ``plugin``, ``plugin_version`` and ``options_hash``.
    On an exception inside ``with``, the ``.partial`` file keeps every row written so far and is not
    renamed, so an interrupted table is never mistaken for a finished one.
    """

    def __init__(self, path: str | Path, run_id: str, rows_per_group: int = 65536, *, plugin: str | None = None,
                 plugin_version: str | None = None, options_hash: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(self.path.name + ".partial")
        claim(self.partial)
        self.constants = {"run_id": run_id, "plugin": plugin, "plugin_version": plugin_version,
                          "options_hash": options_hash}
        if rows_per_group < 1:
            raise StoreError(f"metric table rows_per_group must be at least 1, not {rows_per_group}")
        self.rows_per_group = rows_per_group
        self.writer = pq.ParquetWriter(self.partial, METRIC_SCHEMA)
        # One row group's ids and values in arrays allocated once: buffering each batch as a small Arrow table
        # kept thousands of small allocations alive among the batches' freed tensors, and glibc's heap grew
        # with every batch (~60 KB per image with the covariates on; issue 16)
        self._ids = np.empty(rows_per_group, dtype=object)
        self._values = np.empty(rows_per_group, dtype=np.float64)
        self._runs: list[tuple[str, str, str | None, int]] = []  # (checkpoint, metric, layer, rows) in row order
        self.buffered = 0
        self.rows = 0
        self.closed = False

    def write(self, checkpoint: str, metric: str, layer: str | None, image_ids: Sequence[str],
              values: Sequence[float] | np.ndarray) -> None:
        """Append one value per image for (checkpoint, metric, layer); ``layer=None`` for whole-model metrics."""
        if self.closed:
            raise StoreError(f"metric table {self.path} is closed")
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) != len(image_ids):
            raise StoreError(f"metric {metric!r} layer {layer!r}: {len(values)} values for {len(image_ids)} images")
        ids = [str(i) for i in image_ids]
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, self.rows_per_group - self.buffered)
            self._ids[self.buffered:self.buffered + take] = ids[start:start + take]
            self._values[self.buffered:self.buffered + take] = values[start:start + take]
            self._runs.append((checkpoint, metric, layer, take))
            self.buffered += take
            self.rows += take
            start += take
            if self.buffered == self.rows_per_group:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one row group."""
        n = self.buffered
        if n == 0:
            return
        counts = [run[3] for run in self._runs]
        columns = {"image_id": pa.array(self._ids[:n], pa.string()),
                   **{name: pa.array(np.repeat(np.array([run[k] for run in self._runs], dtype=object), counts),
                                     pa.string()) for k, name in enumerate(("checkpoint", "metric", "layer"))},
                   "value": pa.array(self._values[:n], pa.float64())}
        columns.update({k: pa.array([v] * n, pa.string()) for k, v in self.constants.items()})
        with storage_guard(self.path):
            self.writer.write_table(pa.table(columns, schema=METRIC_SCHEMA))
        self._ids[:n] = None
        self._runs, self.buffered = [], 0

    def close(self) -> None:
        """Flush, fsync and rename ``PATH.partial`` onto ``PATH``."""
        if self.closed:
            return
        self.closed = True
        self.flush()
        with storage_guard(self.path):
            self.writer.close()
        publish(self.partial, self.path)

    def abort(self) -> None:
        """Keep the rows written so far in ``PATH.partial`` (not renamed)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError, StorageFullError):  # best effort: the error that stopped the run counts
                self.flush()
                self.writer.close()

    def __enter__(self) -> MetricTableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close() if exc_type is None else self.abort()


def _check_format(schema: pa.Schema, path: Path) -> None:
    meta = schema.metadata or {}
    if b"format_version" not in meta:
        return  # version 1: no metadata
    try:
        version = int(meta[b"format_version"])
    except ValueError:
        version = -1
    if meta.get(b"fluency_format") != FORMAT.encode() or version < 1:
        raise StoreError(f"metric table {path}: not a fluency metric table (format {meta.get(b'fluency_format')!r}, "
                         f"version {meta[b'format_version']!r})")
    if version > FORMAT_VERSION:
        raise StoreError(f"metric table {path} has format version {version}, newer than this fluency reads "
                         f"(1 to {FORMAT_VERSION}): upgrade fluency")


def read_metric_arrow(path: str | Path) -> pa.Table:
    """The metric table as an Arrow table in the current schema (a version-1 table gets null part columns)."""
    path = _existing(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"metric table {path}: unreadable ({exc})") from None
    _check_format(table.schema, path)
    return conform(table, path)


def _existing(path: str | Path) -> Path:
    """``path``, or one line saying it is missing (and whether an interrupted run left a ``.partial``)."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = f" (an interrupted run left {partial.name})" if partial.exists() else ""
        raise StoreError(f"metric table {path}: no such file{hint}")
    return path


def conform(table: pa.Table, path: Path | str = "") -> pa.Table:
    """``table`` with exactly the current columns, in order (missing part columns added as nulls)."""
    missing = [name for name, _ in _ROW_FIELDS if name not in table.column_names]
    if missing:
        raise StoreError(f"metric table {path}: missing column(s) {missing}")
    columns = [table[name].cast(kind) if name in table.column_names else pa.nulls(len(table), kind)
               for name, kind in _ROW_FIELDS + _PART_FIELDS]
    return pa.Table.from_arrays(columns, schema=METRIC_SCHEMA)


def read_metric_columns(path: str | Path, batch_rows: int = 1 << 16) -> MetricColumns:
    """The metric table's values per output (:class:`MetricColumns`), read ``batch_rows`` rows at a time, so
    that memory holds the compact columns and one batch, never the long table."""
    path = _existing(path)
    builder = ColumnsBuilder()
    try:
        _check_format(pq.read_schema(path), path)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"metric table {path}: unreadable ({exc})") from None
    _each_batch(path, LONG_COLUMNS, batch_rows, lambda batch: builder.add(
        *(_objects(batch.column(name)) for name in LONG_COLUMNS[:4]),
        batch.column("value").to_numpy(zero_copy_only=False).astype(np.float64, copy=False)))
    columns = builder.build()
    release_memory()  # the batches' temporaries were freed between the parts kept: give those pages back
    return columns


def count_metric_rows(path: str | Path) -> tuple[int, int]:
    """(rows, distinct image ids) of a metric table, reading only its ``image_id`` column."""
    path = _existing(path)
    rows, distinct = 0, set[str]()

    def add(batch: pa.RecordBatch) -> None:
        nonlocal rows
        ids = _dictionary(batch.column("image_id"))
        rows += len(ids)
        distinct.update(ids.dictionary.take(pc.unique(ids.indices.drop_null())).to_pylist())

    _each_batch(path, ["image_id"], 1 << 16, add)
    release_memory()
    return rows, len(distinct)


def _each_batch(path: Path, columns: Sequence[str], batch_rows: int, use: Callable[[pa.RecordBatch], None]) -> None:
    """Call ``use`` on every batch of ``columns`` of a metric table (a missing column, an unreadable file: one
    line).

    Read on one thread, strings as dictionaries: Arrow's reading threads each keep memory of their own that
    ``release_unused`` does not return (reading a 100,000-image table left 160 MiB against 117 MiB on one
    thread, no slower; reading its whole ``image_id`` column at once peaked 119 MiB higher; 2026-12-06)."""
    try:
        schema = pq.read_schema(path)
        missing = [name for name in columns if name not in schema.names]
        if missing:
            raise StoreError(f"metric table {path}: missing column(s) {missing}")
        strings = [name for name in columns if pa.types.is_string(schema.field(name).type)]
        with pq.ParquetFile(path, pre_buffer=False, read_dictionary=strings) as pf:
            for batch in pf.iter_batches(batch_rows, columns=list(columns), use_threads=False):
                use(batch)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"metric table {path}: unreadable ({exc})") from None


def _dictionary(column: pa.Array) -> pa.DictionaryArray:
    """A string column as a dictionary array (as it is, when read as one)."""
    return column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column.cast(pa.string()))


def _objects(column: pa.Array) -> np.ndarray:
    """A string column (dictionary-encoded or not) as an object array (None where null), each distinct value
    decoded once."""
    encoded = _dictionary(column)
    words = np.array(encoded.dictionary.cast(pa.string()).to_pylist() + [None], dtype=object)
    return words[encoded.indices.fill_null(len(words) - 1).to_numpy(zero_copy_only=False)]


def read_metric_table(path: str | Path) -> pd.DataFrame:
    """The metric table as a DataFrame (``layer`` is missing/NA for whole-model metrics)."""
    return read_metric_arrow(path).to_pandas()


def merge_tables(sources: Iterable[Path], out: Path, drop_ids: Sequence[str] = (),
                 replaced: Mapping[Path, Sequence[str]] | None = None,
                 rename: Mapping[str, str] | None = None) -> int:
    """Write the rows of ``sources`` (metric tables, in order) to ``out`` atomically, without the rows of the
    images ``drop_ids``, nor those of the metric columns ``replaced[source]`` from that source, streaming one
    row group at a time; returns the number of rows written. ``out`` may be one of the sources (it is replaced
    only when all are read). ``rename`` files rows of some checkpoints under another label (group-matched
    models, :mod:`fluency.core.run.groups`)."""
    drop = pa.array(sorted(set(map(str, drop_ids))), pa.string())
    rows = 0
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, METRIC_SCHEMA) as writer:
            for source in sources:
                _check_format(pq.read_schema(source), source)
                drop_columns = pa.array(sorted(set(map(str, (replaced or {}).get(source, ())))), pa.string())
                with pq.ParquetFile(source, pre_buffer=False) as pf:
                    for group in range(pf.num_row_groups):
                        part = conform(pf.read_row_group(group, use_threads=False), source)
                        if len(drop):
                            part = part.filter(pc.invert(pc.is_in(part["image_id"], value_set=drop)))
                        if len(drop_columns):
                            part = part.filter(pc.invert(pc.is_in(part["metric"], value_set=drop_columns)))
                        if rename:
                            labels = [rename.get(c, c) if c is not None else None
                                      for c in part["checkpoint"].to_pylist()]
                            part = part.set_column(1, "checkpoint", pa.array(labels, pa.string()))
                        writer.write_table(part)
                        rows += len(part)
    release_memory()
    return rows
