"""The Parquet activation store and the long metric table.

Activation store layout (one folder per checkpoint)::

    STORE/
      enc1.parquet        image_id: string, activation: fixed_size_binary(nbytes)
      enc2.parquet        ...
      _COMPLETE.json      written last: format, version, provenance, layers (shape, dtype, rows, file)

Each ``activation`` value holds one image's tensor as raw little-endian bytes
(float16 or float32); shape and dtype are also in the field and schema metadata. No
compression, dictionary encoding or statistics on that column: it writes at disk speed
and reads back as numpy/torch *views* on the Arrow buffers, without copies. Row groups
of ``rows_per_group`` images keep memory bounded on both sides. Layer files are written
as ``*.partial`` and renamed on close; a folder without ``_COMPLETE.json`` is an
interrupted write and the reader refuses it.

The metric table is one long Parquet file ``image_id, checkpoint, metric, layer, value,
run_id`` (``layer`` null for whole-model metrics), readable by pandas, polars, DuckDB, R.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fluency.core.atomic import atomic_write_json, fsync_dir
from fluency.core.errors import StoreError

FORMAT = "fluency-activation-store"
FORMAT_VERSION = 1
MARKER = "_COMPLETE.json"
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


class _LayerWriter:
    """One layer's file: rows are copied into a single preallocated row group, written when full."""

    def __init__(self, path: Path, layer: str, shape: tuple[int, ...], dtype: np.dtype, rows_per_group: int) -> None:
        self.path, self.shape, self.dtype = path, shape, dtype
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        meta = {b"shape": json.dumps(list(shape)).encode(), b"dtype": dtype.name.encode(), b"layer": layer.encode()}
        self.schema = pa.schema([pa.field("image_id", pa.string(), nullable=False),
                                 pa.field("activation", pa.binary(self.nbytes), nullable=False, metadata=meta)],
                                metadata=meta)
        self.partial = path.with_name(path.name + ".partial")
        self.writer = pq.ParquetWriter(self.partial, self.schema, compression="none", use_dictionary=False,
                                       write_statistics=["image_id"])
        self.buffer = np.empty((rows_per_group, *shape), dtype)  # owned: callers may reuse their arrays
        self.ids: list[str] = []
        self.rows = 0

    def add(self, ids: Sequence[str], values: np.ndarray) -> None:
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, len(self.buffer) - len(self.ids))
            self.buffer[len(self.ids):len(self.ids) + take] = values[start:start + take]
            self.ids.extend(str(i) for i in ids[start:start + take])
            start += take
            if len(self.ids) == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        n = len(self.ids)
        if n == 0:
            return
        data = pa.py_buffer(self.buffer[:n])  # zero-copy; the writer encodes it before we reuse the buffer
        acts = pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.nbytes), n, [None, data])
        self.writer.write_table(pa.table([pa.array(self.ids, pa.string()), acts], schema=self.schema))
        self.rows += n
        self.ids = []

    def close(self) -> dict[str, Any]:
        self._flush()
        self.writer.close()
        _fsync(self.partial)
        os.replace(self.partial, self.path)
        return {"shape": list(self.shape), "dtype": self.dtype.name, "rows": self.rows, "file": self.path.name}


class ActivationStoreWriter:
    """Write a store incrementally: ``write(layer, ids, activations)`` per batch, then ``close()``.

    Used as a context manager, an exception (or :meth:`abort`) closes the files without
    the completion marker, so the store can never be read as complete.
    """

    def __init__(self, path: str | Path, *, dtype: str = "float16", rows_per_group: int = 128,
                 provenance: dict[str, Any], overwrite: bool = False) -> None:
        if dtype not in DTYPES:
            raise StoreError(f"activation store dtype {dtype!r}: use one of {list(DTYPES)}")
        if rows_per_group < 1:
            raise StoreError(f"activation store rows_per_group must be at least 1, not {rows_per_group}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"activation store {self.path} is a file, not a folder")
        marker = self.path / MARKER
        if marker.exists():
            if not overwrite:
                raise StoreError(f"activation store {self.path} already exists and is complete; "
                                 "choose another folder or overwrite it")
            old = _read_marker(marker)
            marker.unlink()  # first: from now on the old store reads as incomplete
            for info in old.get("layers", {}).values():
                (self.path / Path(str(info.get("file", ""))).name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = DTYPES[dtype]
        self.rows_per_group = rows_per_group
        self.provenance = dict(provenance)
        self.layers: dict[str, _LayerWriter] = {}
        self.closed = False

    def write(self, layer: str, image_ids: Sequence[str], acts: torch.Tensor | np.ndarray) -> None:
        """Append one batch (B×…) of a layer's activations, cast to the store's dtype."""
        if self.closed:
            raise StoreError(f"activation store {self.path} is closed; cannot write layer {layer!r}")
        if isinstance(acts, torch.Tensor):
            acts = acts.detach().cpu()
            acts = (acts if acts.dtype in (torch.float16, torch.float32, torch.float64) else acts.float()).numpy()
        acts = np.asarray(acts)
        if acts.ndim == 0 or acts.shape[0] != len(image_ids):
            raise StoreError(f"layer {layer!r}: activations of shape {acts.shape} for {len(image_ids)} image ids")
        shape = tuple(int(s) for s in acts.shape[1:])
        writer = self.layers.get(layer)
        if writer is None:
            if not layer or "/" in layer or "\\" in layer or layer.startswith((".", "_")):
                raise StoreError(f"layer name {layer!r} cannot be used as a file name in the store")
            if 0 in shape:
                raise StoreError(f"layer {layer!r}: empty activation shape {shape}")
            writer = self.layers[layer] = _LayerWriter(self.path / f"{layer}.parquet", layer, shape, self.dtype,
                                                       self.rows_per_group)
        elif shape != writer.shape:
            raise StoreError(f"layer {layer!r}: activation shape changed from {writer.shape} to {shape} "
                             "between writes")
        writer.add(image_ids, acts)

    def close(self) -> None:
        """Flush every layer, rename the files into place, then write the completion marker last."""
        if self.closed:
            return
        self.closed = True
        layers = {name: w.close() for name, w in self.layers.items()}
        fsync_dir(self.path)  # the layer renames are durable before the marker exists
        atomic_write_json(self.path / MARKER, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                               "provenance": self.provenance, "layers": layers})

    def abort(self) -> None:
        """Close the files without the marker (the store stays recognisably incomplete)."""
        self.closed = True
        for w in self.layers.values():
            w.writer.close()

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close() if exc_type is None else self.abort()


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"activation store {marker.parent}: unreadable {MARKER} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
        raise StoreError(f"activation store {marker.parent}: unknown format {found[0]!r} version {found[1]!r} "
                         f"(this fluency reads {FORMAT!r} version {FORMAT_VERSION})")
    return meta


class ActivationStore:
    """Read a complete store: ``layers``, ``provenance``, and zero-copy batches per layer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"activation store {self.path}: no such folder")
        marker = self.path / MARKER
        if not marker.exists():
            raise StoreError(f"activation store {self.path} is incomplete (no {MARKER}): the write was probably "
                             "interrupted; compute it again")
        self.meta = _read_marker(marker)

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta["provenance"])

    def _layer(self, layer: str) -> dict[str, Any]:
        if layer not in self.meta["layers"]:
            raise StoreError(f"activation store {self.path} has no layer {layer!r}; it has {self.layers}")
        return self.meta["layers"][layer]

    def shape(self, layer: str) -> tuple[int, ...]:
        return tuple(self._layer(layer)["shape"])

    def dtype(self, layer: str) -> np.dtype:
        return DTYPES[self._layer(layer)["dtype"]]

    def num_rows(self, layer: str) -> int:
        return int(self._layer(layer)["rows"])

    def iter_batches(self, layer: str, batch_size: int = 256) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, B×shape array)`` per batch; the array is a view on Arrow's buffer (no copy)."""
        shape, dtype = self.shape(layer), self.dtype(layer)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        file = self.path / self._layer(layer)["file"]
        if not file.exists():
            raise StoreError(f"activation store {self.path}: layer file {file.name} is missing")
        with pq.ParquetFile(file) as pf:
            for batch in pf.iter_batches(batch_size=batch_size):
                column = batch.column("activation")
                if column.type != pa.binary(nbytes) or column.null_count:
                    raise StoreError(f"activation store {self.path}: layer {layer!r} does not match "
                                     f"its shape {shape} and dtype {dtype.name} (corrupt file?)")
                n = len(column)
                values = np.frombuffer(column.buffers()[1], dtype=dtype, count=n * nbytes // dtype.itemsize,
                                       offset=column.offset * nbytes) if n else np.empty(0, dtype)
                yield batch.column("image_id").to_pylist(), values.reshape((n, *shape))

    def iter_torch(self, layer: str, batch_size: int = 256) -> Iterator[tuple[list[str], torch.Tensor]]:
        """As :meth:`iter_batches`, as torch tensors sharing the same memory."""
        for ids, values in self.iter_batches(layer, batch_size):
            with warnings.catch_warnings():  # a read-only buffer (memory map) warns; we only read from it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
                tensor = torch.from_numpy(values)
            yield ids, tensor

    def read_layer(self, layer: str) -> tuple[list[str], np.ndarray]:
        """All rows of a layer (a copy: holds the whole layer in memory)."""
        ids: list[str] = []
        parts: list[np.ndarray] = []
        for batch_ids, values in self.iter_batches(layer):
            ids.extend(batch_ids)
            parts.append(values)
        return ids, (np.concatenate(parts) if parts else np.empty((0, *self.shape(layer)), self.dtype(layer)))


METRIC_SCHEMA = pa.schema([("image_id", pa.string()), ("checkpoint", pa.string()), ("metric", pa.string()),
                           ("layer", pa.string()), ("value", pa.float64()), ("run_id", pa.string())])


class MetricTableWriter:
    """Write the long metric table incrementally to ``PATH.partial``; ``close()`` renames it into place.

    On an exception inside ``with``, the ``.partial`` file keeps every row written so far
    and is not renamed, so an interrupted table is never mistaken for a finished one.
    """

    def __init__(self, path: str | Path, run_id: str, rows_per_group: int = 65536) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.run_id = run_id
        self.rows_per_group = rows_per_group
        self.writer = pq.ParquetWriter(self.partial, METRIC_SCHEMA)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.closed = False

    def write(self, checkpoint: str, metric: str, layer: str | None, image_ids: Sequence[str],
              values: Sequence[float] | np.ndarray) -> None:
        """Append one value per image for (checkpoint, metric, layer); ``layer=None`` for whole-model metrics."""
        if self.closed:
            raise StoreError(f"metric table {self.path} is closed")
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) != len(image_ids):
            raise StoreError(f"metric {metric!r} layer {layer!r}: {len(values)} values for {len(image_ids)} images")
        n = len(values)
        self.buffer.append(pa.table({
            "image_id": pa.array([str(i) for i in image_ids], pa.string()),
            "checkpoint": pa.array([checkpoint] * n, pa.string()), "metric": pa.array([metric] * n, pa.string()),
            "layer": pa.array([layer] * n, pa.string()), "value": pa.array(values, pa.float64()),
            "run_id": pa.array([self.run_id] * n, pa.string())}, schema=METRIC_SCHEMA))
        self.buffered += n
        if self.buffered >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one row group."""
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer))
            self.buffer, self.buffered = [], 0

    def close(self) -> None:
        """Flush, fsync and rename ``PATH.partial`` onto ``PATH``."""
        if self.closed:
            return
        self.closed = True
        self.flush()
        self.writer.close()
        _fsync(self.partial)
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)

    def __enter__(self) -> MetricTableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        elif not self.closed:
            self.closed = True
            self.flush()
            self.writer.close()


def read_metric_table(path: str | Path) -> pd.DataFrame:
    """The metric table as a DataFrame (``layer`` is missing/NA for whole-model metrics)."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = f" (an interrupted run left {partial.name})" if partial.exists() else ""
        raise StoreError(f"metric table {path}: no such file{hint}")
    return pq.read_table(path).to_pandas()
