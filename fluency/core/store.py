"""The Parquet activation store and the long metric table.

Activation store layout (one folder per checkpoint)::

    STORE/
      enc1.parquet        image_id: string, activation: fixed_size_binary(nbytes)
      enc2.parquet        ...
      _COMPLETE.json      written last: format, provenance, layers (shape, dtype, rows, file)

Each ``activation`` value holds one image's tensor as raw little-endian bytes
(float16 or float32); shape and dtype are in the schema metadata. No compression,
dictionary encoding or statistics on that column: it writes at disk speed and reads
back as numpy/torch *views* on the Arrow buffers, without copies. Row groups of
``rows_per_group`` images keep memory bounded on both sides. Layer files are written
as ``*.partial`` and renamed on close; a folder without ``_COMPLETE.json`` is an
interrupted write and the reader refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fluency.core.atomic import atomic_write_json
from fluency.core.errors import StoreError

FORMAT = "fluency-activation-store"
FORMAT_VERSION = 1
MARKER = "_COMPLETE.json"
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class _LayerWriter:
    """Buffers one layer's rows and writes them a row group at a time."""

    def __init__(self, path: Path, layer: str, shape: tuple[int, ...], dtype: np.dtype, rows_per_group: int) -> None:
        self.path, self.layer, self.shape, self.dtype = path, layer, shape, dtype
        self.rows_per_group = rows_per_group
        nbytes = int(np.prod(shape)) * dtype.itemsize
        meta = {b"shape": json.dumps(list(shape)).encode(), b"dtype": dtype.name.encode(), b"layer": layer.encode()}
        self.schema = pa.schema([pa.field("image_id", pa.string()),
                                 pa.field("activation", pa.binary(nbytes), metadata=meta)], metadata=meta)
        self.partial = path.with_name(path.name + ".partial")
        self.writer = pq.ParquetWriter(self.partial, self.schema, compression="none", use_dictionary=False,
                                       write_statistics=["image_id"])
        self.ids: list[str] = []
        self.chunks: list[np.ndarray] = []
        self.rows = 0

    def add(self, ids: Sequence[str], values: np.ndarray) -> None:
        self.ids.extend(ids)
        self.chunks.append(values)
        while len(self.ids) >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int | None = None) -> None:
        if not self.ids:
            return
        data = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        n = len(self.ids) if n is None else n
        head = np.ascontiguousarray(data[:n])
        nbytes = head[0].nbytes
        values = pa.FixedSizeBinaryArray.from_buffers(pa.binary(nbytes), n, [None, pa.py_buffer(head)])
        self.writer.write_table(pa.table([pa.array(self.ids[:n], pa.string()), values], schema=self.schema))
        self.rows += n
        self.ids = self.ids[n:]
        self.chunks = [data[n:]] if len(self.ids) else []

    def close(self) -> dict[str, Any]:
        self._flush()
        self.writer.close()
        _fsync(self.partial)
        os.replace(self.partial, self.path)
        return {"shape": list(self.shape), "dtype": self.dtype.name, "rows": self.rows, "file": self.path.name}

    def abort(self) -> None:
        self.writer.close()


class ActivationStoreWriter:
    """Write a store incrementally: ``write(layer, ids, activations)`` per batch, then ``close()``.

    Used as a context manager, an exception leaves the store without its completion
    marker, so it can never be read as complete.
    """

    def __init__(self, path: str | Path, *, dtype: str = "float16", rows_per_group: int = 128,
                 provenance: dict[str, Any] | None = None, overwrite: bool = False) -> None:
        if dtype not in DTYPES:
            raise StoreError(f"activation store dtype {dtype!r}: use one of {list(DTYPES)}")
        self.path = Path(path)
        if (self.path / MARKER).exists():
            if not overwrite:
                raise StoreError(f"activation store {self.path} already exists and is complete; "
                                 "choose another folder or overwrite it")
            (self.path / MARKER).unlink()
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = DTYPES[dtype]
        self.rows_per_group = rows_per_group
        self.provenance = dict(provenance or {})
        self.layers: dict[str, _LayerWriter] = {}
        self.closed = False

    def write(self, layer: str, image_ids: Sequence[str], acts: torch.Tensor | np.ndarray) -> None:
        """Append one batch (B×…) of a layer's activations."""
        if isinstance(acts, torch.Tensor):
            acts = acts.detach().to("cpu", torch.float32).numpy()
        values = np.asarray(acts).astype(self.dtype, copy=False)
        if values.shape[0] != len(image_ids):
            raise StoreError(f"layer {layer!r}: {values.shape[0]} activations for {len(image_ids)} image ids")
        shape = tuple(values.shape[1:])
        writer = self.layers.get(layer)
        if writer is None:
            if "/" in layer or layer.startswith((".", "_")):
                raise StoreError(f"layer name {layer!r} cannot be used as a file name in the store")
            writer = self.layers[layer] = _LayerWriter(self.path / f"{layer}.parquet", layer, shape, self.dtype,
                                                       self.rows_per_group)
        elif shape != writer.shape:
            raise StoreError(f"layer {layer!r}: activation shape changed from {writer.shape} to {shape}")
        writer.add([str(i) for i in image_ids], values)

    def close(self) -> None:
        """Flush every layer, rename the files into place, then write the completion marker."""
        if self.closed:
            return
        layers = {name: w.close() for name, w in self.layers.items()}
        atomic_write_json(self.path / MARKER, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                               "provenance": self.provenance, "layers": layers})
        self.closed = True

    def abort(self) -> None:
        """Close the files without the marker (the store stays recognisably incomplete)."""
        for w in self.layers.values():
            w.abort()
        self.closed = True

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
        try:
            self.meta = json.loads(marker.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"activation store {self.path}: unreadable {MARKER} ({exc})") from None
        if self.meta.get("format") != FORMAT or int(self.meta.get("format_version", 0)) > FORMAT_VERSION:
            raise StoreError(f"activation store {self.path}: unknown format {self.meta.get('format')!r} "
                             f"version {self.meta.get('format_version')!r}")

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
        """``(ids, B×shape array)`` per batch; the array is a read-only view on Arrow's buffer."""
        info = self._layer(layer)
        shape, dtype = tuple(info["shape"]), DTYPES[info["dtype"]]
        nbytes = int(np.prod(shape)) * dtype.itemsize
        for batch in pq.ParquetFile(self.path / info["file"]).iter_batches(batch_size=batch_size):
            column = batch.column("activation")
            if column.null_count:
                raise StoreError(f"activation store {self.path}: null activations in layer {layer!r}")
            buffer = column.buffers()[1]
            values = np.frombuffer(buffer, dtype=dtype, count=len(column) * nbytes // dtype.itemsize,
                                   offset=column.offset * nbytes)
            yield batch.column("image_id").to_pylist(), values.reshape((len(column), *shape))

    def iter_torch(self, layer: str, batch_size: int = 256) -> Iterator[tuple[list[str], torch.Tensor]]:
        """As :meth:`iter_batches`, as torch tensors sharing the same memory (do not write to them)."""
        import warnings

        for ids, values in self.iter_batches(layer, batch_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the buffer is read-only; we never write
                yield ids, torch.from_numpy(values)

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

    On an exception inside ``with``, the ``.partial`` file keeps every row written so far.
    """

    def __init__(self, path: str | Path, run_id: str, rows_per_group: int = 65536) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.run_id = run_id
        self.rows_per_group = rows_per_group
        self.writer = pq.ParquetWriter(self.partial, METRIC_SCHEMA)
        self.buffer: list[pa.Table] = []
        self.buffered = 0

    def write(self, checkpoint: str, metric: str, layer: str | None, image_ids: Sequence[str],
              values: Sequence[float] | np.ndarray) -> None:
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
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer))
            self.buffer, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
        _fsync(self.partial)
        os.replace(self.partial, self.path)

    def __enter__(self) -> MetricTableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
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
