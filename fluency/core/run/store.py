"""The Parquet activation store: written batch by batch, read back as zero-copy batches.

Activation store layout (one folder per checkpoint)::

    STORE/
      enc1.parquet        image_id: string, activation: fixed_size_binary(nbytes)
      enc2.parquet        ...
      _COMPLETE.json      written last: format, format_version, provenance, model (the description
                          metrics take their defaults from), layers (shape, dtype, rows, file)

Each ``activation`` value holds one image's tensor as raw little-endian bytes
(float16 or float32); shape and dtype are also in the field and schema metadata. No
compression, dictionary encoding or statistics on that column: it writes at disk speed
and reads back as numpy/torch *views* on the Arrow buffers, without copies. Row groups
of ``rows_per_group`` images keep the writer's memory bounded; the reader decodes a few MiB
(``READ_BYTES``) at a time from the memory-mapped file, a readahead thread fetching the next. Layer files are written
as ``*.partial`` and renamed on close; a folder without ``_COMPLETE.json`` is an
interrupted write and the reader refuses it. Every layer file holds the same image ids in the
same order, so :meth:`ActivationStore.metric_batches` reads the layers in lockstep and yields
the :class:`~fluency.core.plugin.metric.MetricBatch` a run's live capture would have given.

Format versions: 1 (fluency 0.1.0 before the store became the interchange) had no ``model``
description; its default metric layers are taken to be the stored layers. A store of a newer
format than this fluency knows is refused with one line.

The metric tables are in :mod:`fluency.core.run.tables`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fluency.core.atomic import atomic_write_json, fsync_dir, publish, storage_guard
from fluency.core.errors import StorageFullError, StoreError, error_text
from fluency.core.plugin.metric import MetricBatch, ModelDescription
from fluency.core.version import STORE_FORMAT_VERSION as FORMAT_VERSION

FORMAT = "fluency-activation-store"
MARKER = "_COMPLETE.json"
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
#: how many bytes of a layer one read decodes at most, or one batch where that is more: batches are views into the
#: read, so small batches cost one Arrow call per few MiB, and a reader's memory stays flat whatever the layer's size
READ_BYTES = 4 * 2**20


class _LayerWriter:
    """One layer's file: rows are copied into a single preallocated row group, written when full."""

    def __init__(self, path: Path, layer: str, shape: tuple[int, ...], dtype: np.dtype, rows_per_group: int) -> None:
        self.path, self.layer, self.shape = path, layer, shape
        self.partial = path.with_name(path.name + ".partial")
        self.ids: list[str] = []
        self.rows = 0
        self._open(dtype, rows_per_group)

    def _open(self, dtype: np.dtype, rows_per_group: int) -> None:
        """Start ``self.partial`` as a file of ``dtype`` values, with an empty row-group buffer."""
        self.dtype = dtype
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        meta = {b"shape": json.dumps(list(self.shape)).encode(), b"dtype": dtype.name.encode(),
                b"layer": self.layer.encode()}
        self.schema = pa.schema([pa.field("image_id", pa.string(), nullable=False),
                                 pa.field("activation", pa.binary(self.nbytes), nullable=False, metadata=meta)],
                                metadata=meta)
        self.writer = pq.ParquetWriter(self.partial, self.schema, compression="none", use_dictionary=False,
                                       write_statistics=["image_id"])
        self.buffer = np.empty((rows_per_group, *self.shape), dtype)  # owned: callers may reuse their arrays

    def widen(self) -> int:
        """Continue as float32, converting the rows written so far (exactly: float16 ⊂ float32); returns how many
        rows were converted. Streams one row group at a time, so memory stays bounded."""
        converted, buffered, pending = self.rows + len(self.ids), self.buffer[:len(self.ids)].astype("<f4"), self.ids
        self.writer.close()
        old = self.partial.with_name(self.path.name + ".float16.partial")
        self.partial.replace(old)
        self._open(DTYPES["float32"], len(self.buffer))
        with pq.ParquetFile(old) as pf:
            for group in range(pf.num_row_groups):
                table = pf.read_row_group(group)
                n, column = table.num_rows, table.column("activation").combine_chunks()
                values = np.frombuffer(column.buffers()[1], "<f2", count=n * self.nbytes // 4,
                                       offset=column.offset * self.nbytes // 2).astype("<f4")
                acts = pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.nbytes), n, [None, pa.py_buffer(values)])
                self.writer.write_table(pa.table([table.column("image_id"), acts], schema=self.schema))
        old.unlink()
        self.ids = []
        self.add(pending, buffered)
        return converted

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
        publish(self.partial, self.path)
        return {"shape": list(self.shape), "dtype": self.dtype.name, "rows": self.rows, "file": self.path.name}


class ActivationStoreWriter:
    """Write a store incrementally: ``write(layer, ids, activations)`` per batch, then ``close()``.

    ``model`` describes the model the activations come from (its default and attention layers), so
    that metrics measuring the store later take the same defaults as a live run.

    Used as a context manager, an exception (or :meth:`abort`) closes the files without
    the completion marker, so the store can never be read as complete.
    """

    def __init__(self, path: str | Path, *, dtype: str = "float16", rows_per_group: int = 128,
                 provenance: dict[str, Any], model: ModelDescription | None = None, overwrite: bool = False) -> None:
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
        self.model = model
        self.layers: dict[str, _LayerWriter] = {}
        self.closed = False
        #: layers moved from float16 to float32 because a value exceeded float16 (recorded in the marker) and
        #: one line per such layer for the console
        self.widened: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    def write(self, layer: str, image_ids: Sequence[str], acts: torch.Tensor | np.ndarray) -> None:
        """Append one batch (B×…) of a layer's activations, cast to the store's dtype.

        NaN or ±inf is an error naming the image. A float16 layer that meets a value beyond float16's range
        (|x| > 65504) continues as float32 (the rows before are converted, keeping their float16 precision),
        recorded as ``widened`` in the marker and in :attr:`notes`; values too small for float16 become
        subnormal or zero, as float16 rounding does, and are not an error.
        """
        if self.closed:
            raise StoreError(f"activation store {self.path} is closed; cannot write layer {layer!r}")
        if isinstance(acts, torch.Tensor):
            acts = acts.detach().cpu()
            acts = (acts if acts.dtype in (torch.float16, torch.float32, torch.float64) else acts.float()).numpy()
        acts = np.asarray(acts)
        if acts.ndim == 0 or acts.shape[0] != len(image_ids):
            raise StoreError(f"layer {layer!r}: activations of shape {acts.shape} for {len(image_ids)} image ids")
        peak = _peak(layer, image_ids, acts)
        shape = tuple(int(s) for s in acts.shape[1:])
        writer = self.layers.get(layer)
        if writer is None:
            if not layer or "/" in layer or "\\" in layer or layer.startswith((".", "_")):
                raise StoreError(f"layer name {layer!r} cannot be used as a file name in the store")
            if 0 in shape:
                raise StoreError(f"layer {layer!r}: empty activation shape {shape}")
            wide = self.dtype == DTYPES["float16"] and peak > FLOAT16_MAX
            writer = self.layers[layer] = _LayerWriter(self.path / f"{layer}.parquet", layer, shape,
                                                       DTYPES["float32"] if wide else self.dtype, self.rows_per_group)
            if wide:
                self._widened(layer, 0, peak)
        elif shape != writer.shape:
            raise StoreError(f"layer {layer!r}: activation shape changed from {writer.shape} to {shape} "
                             "between writes")
        with storage_guard(writer.path):
            if writer.dtype == DTYPES["float16"] and peak > FLOAT16_MAX:
                self._widened(layer, writer.widen(), peak)
            writer.add(image_ids, acts)

    def check_room(self, total_images: int) -> None:
        """Refuse, after the first batch and before the bulk is written, a store whose remaining rows will not fit
        in the free space of its disk (from the bytes per image of the layers written so far)."""
        per_image = sum(w.nbytes for w in self.layers.values())
        written = max((w.rows + len(w.ids) for w in self.layers.values()), default=0)
        need, free = per_image * max(total_images - written, 0), shutil.disk_usage(self.path).free
        if need > free:
            raise StorageFullError(
                f"{self.path}: the activation store needs about {need / 2**20:,.0f} MiB more for {total_images} "
                f"images ({per_image / 2**10:,.0f} KiB per image over {len(self.layers)} layers), but only "
                f"{free / 2**20:,.0f} MiB are free there; store fewer layers (--store-layers LAYER,...), no store "
                "(--no-store), or free some space")

    def _widened(self, layer: str, rows: int, peak: float) -> None:
        """Record that ``layer`` is stored as float32 from now on (``rows`` earlier rows are float16-rounded)."""
        self.widened[layer] = {"from": "float16", "float16_rows": rows, "peak": peak}
        kept = f"; the {rows} rows written before keep float16 precision" if rows else ""
        self.notes.append(f"activation store: layer {layer!r} has values up to {peak:.3g}, beyond float16's "
                          f"{FLOAT16_MAX:.0f}: stored as float32{kept}")

    def close(self) -> None:
        """Flush every layer, rename the files into place, then write the completion marker last."""
        if self.closed:
            return
        self.closed = True
        layers = {}
        for name, w in self.layers.items():
            with storage_guard(w.path):
                layers[name] = {**w.close(), **({"widened": self.widened[name]} if name in self.widened else {})}
        fsync_dir(self.path)  # the layer renames are durable before the marker exists
        atomic_write_json(self.path / MARKER, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                               "provenance": self.provenance,
                                               "model": self.model.as_dict() if self.model is not None else None,
                                               "layers": layers})

    def abort(self) -> None:
        """Close the files without the marker (the store stays recognisably incomplete)."""
        self.closed = True
        for w in self.layers.values():
            with contextlib.suppress(OSError):  # best effort (a full disk, say): the error that stopped the run counts
                w.writer.close()

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close() if exc_type is None else self.abort()


def _peak(layer: str, image_ids: Sequence[str], acts: np.ndarray) -> float:
    """The largest magnitude in ``acts``; NaN or ±inf is a :class:`StoreError` naming the first such image."""
    if not acts.size:
        return 0.0
    if acts.dtype == np.float16:
        return _peak_float16(layer, image_ids, acts)
    high, low = float(acts.max()), float(acts.min())  # NaN propagates; no copy, unlike abs()
    if not (np.isfinite(high) and np.isfinite(low)):
        bad = int(np.flatnonzero(~np.isfinite(acts.reshape(len(acts), -1)).all(axis=1))[0])
        raise StoreError(f"layer {layer!r}: NaN or infinite activations for image {str(image_ids[bad])!r}; a store "
                         "holds finite values only")
    return max(abs(high), abs(low))


def _peak_float16(layer: str, image_ids: Sequence[str], acts: np.ndarray) -> float:
    """:func:`_peak` for float16 input, on the bits: numpy reduces float16 in software (about 10× slower than
    float32, which made a float16 write 0.1× ``np.save``), while float16 magnitudes sort as their bits do without
    the sign, and exponent bits all set are NaN or ±inf."""
    bits = np.ascontiguousarray(acts).view(np.uint16).reshape(len(acts), -1)
    top = int(np.bitwise_and(bits, 0x7FFF).max())
    if top >= 0x7C00:
        bad = int(np.flatnonzero((np.bitwise_and(bits, 0x7C00) == 0x7C00).any(axis=1))[0])
        raise StoreError(f"layer {layer!r}: NaN or infinite activations for image {str(image_ids[bad])!r}; a store "
                         "holds finite values only")
    return float(np.uint16(top).view(np.float16))


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"activation store {marker.parent}: unreadable {MARKER} ({exc})") from None
    found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
    if found[0] != FORMAT or not isinstance(found[1], int) or isinstance(found[1], bool) or found[1] < 1:
        raise StoreError(f"activation store {marker.parent}: unknown format {found[0]!r} version {found[1]!r} "
                         f"(this fluency reads {FORMAT!r} versions 1 to {FORMAT_VERSION})")
    if found[1] > FORMAT_VERSION:
        raise StoreError(f"activation store {marker.parent} has format version {found[1]}, newer than this fluency "
                         f"reads (1 to {FORMAT_VERSION}): upgrade fluency")
    if not isinstance(meta.get("layers"), dict) or not isinstance(meta.get("provenance", {}), dict):
        raise StoreError(f"activation store {marker.parent}: {MARKER} has no valid 'layers' table")
    for name, info in meta["layers"].items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)
                and math.prod(shape) * 4 < 2**31 and str(info.get("dtype")) in DTYPES  # one image's bytes: int32
                and isinstance(info.get("rows"), int) and info["rows"] >= 0
                and isinstance(info.get("file"), str) and Path(info["file"]).name):
            raise StoreError(f"activation store {marker.parent}: {MARKER} describes layer {name!r} wrongly (needs "
                             f"shape, dtype in {list(DTYPES)}, rows and file): {info!r:.200}")
    if not _valid_model(meta.get("model")):
        raise StoreError(f"activation store {marker.parent}: {MARKER} describes the model wrongly: "
                         f"{meta.get('model')!r:.200}")
    return meta


def _valid_model(model: Any) -> bool:
    """Whether a marker's ``model`` is absent or has the fields of :meth:`ModelDescription.as_dict` typed right."""
    if model is None:
        return True
    if not isinstance(model, dict):
        return False
    texts = all(isinstance(model.get(key, ""), str) for key in ("architecture", "checkpoint", "checkpoint_sha256"))
    lists = all(isinstance(model.get(key) or [], list) and all(isinstance(v, str) for v in model.get(key) or [])
                for key in ("default_metric_layers", "attention_layers"))
    shape = model.get("input_shape") or []
    return texts and lists and isinstance(shape, list) and all(isinstance(v, int) for v in shape)


def _not_a_store(path: Path) -> str:
    """Why ``path`` (a folder without the marker) is not a readable store."""
    inner = sorted(p.parent.name for p in path.glob(f"*/{MARKER}"))
    if (path / "manifest.json").exists() or inner:
        where = f"{path}/activations/<checkpoint>" if (path / "manifest.json").exists() else \
            ", ".join(str(path / name) for name in inner[:5])
        return f"{path} is not an activation store but holds stores ({where}): give one of those"
    return (f"activation store {path} is incomplete (no {MARKER}): the write was probably interrupted; compute "
            "it again")


#: a checkpoint label that is safe as a file name (written into state/<label>/)
_SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]{0,199}")


class ActivationStore:
    """Read a complete store: ``layers``, ``provenance``, and zero-copy batches per layer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"activation store {self.path}: no such folder")
        marker = self.path / MARKER
        if not marker.exists():
            raise StoreError(_not_a_store(self.path))
        self.meta = _read_marker(marker)
        names = self.meta.get("shards") or []
        if not isinstance(names, list) or not all(isinstance(n, str) and _SAFE_LABEL.fullmatch(n) for n in names):
            raise StoreError(f"activation store {self.path}: {MARKER} lists its shards wrongly: {names!r:.200}")
        #: the stores of a sharded store (one per unit of work of a run), read one after the other
        self.shards = [ActivationStore(self.path / name) for name in names]

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("provenance") or {})

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    @cached_property
    def description(self) -> ModelDescription:
        """The model the activations came from; for a store without one (version 1, or written without a
        model) the default metric layers are the stored layers, which is what version 1 stored."""
        recorded = self.meta.get("model")
        if isinstance(recorded, dict):
            return ModelDescription.from_dict(recorded)
        prov = self.provenance
        return ModelDescription("", tuple(self.layers), (), str(prov.get("checkpoint", "")),
                                str(prov.get("checkpoint_sha256", "")))

    @property
    def label(self) -> str:
        """The checkpoint label the store is filed under: the recorded one when it is a safe file name, else the
        store's folder name (a store from elsewhere must not choose where fluency writes)."""
        recorded = self.description.checkpoint
        if recorded and _SAFE_LABEL.fullmatch(recorded):
            return recorded
        name = self.path.resolve().name
        return name if _SAFE_LABEL.fullmatch(name) else "store"

    @cached_property
    def image_ids(self) -> list[str]:
        """The image ids of the store, in row order (read once from the first layer's id column)."""
        if self.shards:
            return [i for shard in self.shards for i in shard.image_ids]
        if not self.layers:
            return []
        file = self._file(self.layers[0])
        with self._reading(file), pq.ParquetFile(file) as pf:
            return [str(i) for i in pf.read(columns=["image_id"]).column("image_id").to_pylist()]

    @contextmanager
    def _reading(self, file: Path) -> Iterator[None]:
        """Turn Arrow's errors on a damaged layer file into one line naming the file."""
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"activation store {self.path}: layer file {file.name} is unreadable or corrupt "
                             f"({error_text(exc, 160)})") from None

    def _layer(self, layer: str) -> dict[str, Any]:
        if layer not in self.meta["layers"]:
            raise StoreError(f"activation store {self.path} has no layer {layer!r}; it has {self.layers}")
        return self.meta["layers"][layer]

    def shape(self, layer: str) -> tuple[int, ...]:
        """The shape of one image\'s activations in ``layer``."""
        return tuple(self._layer(layer)["shape"])

    def dtype(self, layer: str) -> np.dtype:
        """The stored value type of ``layer`` (float16 or float32; readers hand metrics float32)."""
        return DTYPES[self._layer(layer)["dtype"]]

    def num_rows(self, layer: str) -> int:
        """The number of images stored for ``layer``."""
        return int(self._layer(layer)["rows"])

    def iter_batches(self, layer: str, batch_size: int = 256) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, B×shape array)`` per batch of ``batch_size`` rows (the last may be shorter); the array is a view
        on Arrow's buffer (no copy). A sharded store gives its shards' batches in order (a batch never spans two
        shards)."""
        reads = max(1, READ_BYTES // max(1, batch_size * self._row_bytes(layer)))  # batches decoded per read
        for ids, values in self._chunks(layer, batch_size * reads):
            for start in range(0, len(ids), batch_size):
                yield ids[start:start + batch_size], values[start:start + batch_size]

    def _row_bytes(self, layer: str) -> int:
        """The stored bytes of one image's activations in ``layer``."""
        return int(np.prod(self.shape(layer), dtype=np.int64)) * self.dtype(layer).itemsize

    def _chunks(self, layer: str, rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, array)`` of ``rows`` rows at a time (fewer at a shard's end), each decoded by one Arrow call
        from the memory-mapped file: large reads cost Arrow and Python little per image, and the map spares the
        copy into a read buffer."""
        if self.shards:
            self._layer(layer)
            for shard in self.shards:
                yield from shard._chunks(layer, rows)
            return
        file = self._file(layer)
        with self._reading(file), pq.ParquetFile(file, memory_map=True, pre_buffer=False) as pf, \
                _Readahead(file, pf.metadata.num_rows) as readahead:
            if not {"image_id", "activation"} <= set(pf.schema_arrow.names):
                raise StoreError(f"activation store {self.path}: layer file {file.name} has no image_id and "
                                 "activation columns (corrupt file?)")
            batches, done = pf.iter_batches(batch_size=rows, columns=["image_id", "activation"]), 0
            while True:
                readahead.upto(done + 2 * rows)  # this read and the next
                batch = next(batches, None)
                if batch is None:
                    return
                done += batch.num_rows
                yield batch.column("image_id").to_pylist(), self._values(layer, batch.column("activation"))

    def _values(self, layer: str, column: pa.Array) -> np.ndarray:
        """A ``fixed_size_binary`` column of ``layer`` as an N×shape array viewing Arrow's buffer."""
        shape, dtype, nbytes = self.shape(layer), self.dtype(layer), self._row_bytes(layer)
        if column.type != pa.binary(nbytes) or column.null_count:
            raise StoreError(f"activation store {self.path}: layer {layer!r} does not match "
                             f"its shape {shape} and dtype {dtype.name} (corrupt file?)")
        n = len(column)
        values = np.frombuffer(column.buffers()[1], dtype=dtype, count=n * nbytes // dtype.itemsize,
                               offset=column.offset * nbytes) if n else np.empty(0, dtype)
        return values.reshape((n, *shape))

    def _file(self, layer: str) -> Path:
        file = self.path / Path(str(self._layer(layer)["file"])).name
        if not file.exists():
            raise StoreError(f"activation store {self.path}: layer file {file.name} is missing")
        return file

    def metric_batches(self, layers: Sequence[str] | None = None,
                       batch_size: int = 256) -> Iterator[MetricBatch]:
        """The store as the batches a metric reads: float32 tensors of ``layers`` (default: all), read in
        lockstep, with the store's model description; no model and no images.

        A float32 store gives views on Arrow's buffers (no copy); a float16 store is upcast per batch, so
        memory stays bounded by one batch of every layer read.
        """
        names = list(self.layers if layers is None else layers)
        for name in names:
            self._layer(name)
        description = self.description
        readers = [self.iter_torch(name, batch_size) for name in names]
        while True:
            parts = [next(reader, None) for reader in readers]
            if not names or parts[0] is None:
                if any(p is not None for p in parts):
                    raise StoreError(f"activation store {self.path}: layers {names} have different row counts")
                return
            if any(p is None or p[0] != parts[0][0] for p in parts):
                raise StoreError(f"activation store {self.path}: layers {names} do not hold the same images in the "
                                 "same order (corrupt store?)")
            acts = {name: (t if t.dtype == torch.float32 else t.float()) for name, (_, t) in zip(names, parts)}
            yield MetricBatch(parts[0][0], activations=acts, description=description)

    def iter_torch(self, layer: str, batch_size: int = 256) -> Iterator[tuple[list[str], torch.Tensor]]:
        """As :meth:`iter_batches`, as torch tensors sharing the same memory."""
        for ids, values in self.iter_batches(layer, batch_size):
            with warnings.catch_warnings():  # a read-only buffer (memory map) warns; we only read from it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
                tensor = torch.from_numpy(values)
            yield ids, tensor

    def read_layer(self, layer: str) -> tuple[list[str], np.ndarray]:
        """All rows of a layer (holds the whole layer in memory): one Arrow read per shard, decoded straight into
        the array returned, which owns its memory (a writable array, not a view on the file)."""
        ids: list[str] = []
        parts: list[np.ndarray] = []
        for chunk_ids, values in self._chunks(layer, max(1, self.num_rows(layer))):
            ids.extend(chunk_ids)
            parts.append(values)
        if len(parts) > 1:
            return ids, np.concatenate(parts)  # shards (a float16 shard of a float32 layer is upcast)
        if not parts:
            return ids, np.empty((0, *self.shape(layer)), self.dtype(layer))
        return ids, parts[0] if parts[0].flags.writeable else parts[0].copy()


class _Readahead:
    """Have the kernel read a file into the page cache ahead of a memory-mapped reader, from a thread, so that the
    disk works while the caller computes: page faults alone fetch a cold file in small pieces, one after the
    other (about 0.7× the speed of ``np.load``'s one large read). Rows are taken to be spread evenly through the
    file. Best effort: a no-op where ``posix_fadvise`` is missing, and its errors are ignored."""

    BLOCK = 8 * 2**20  # bytes advised per call

    def __init__(self, file: Path, rows: int) -> None:
        self.rows, self.wanted, self.closed = max(rows, 1), 0, False
        self.fd = os.open(file, os.O_RDONLY) if hasattr(os, "posix_fadvise") else None
        self.size = os.fstat(self.fd).st_size if self.fd is not None else 0
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._advise, name=f"readahead {file.name}", daemon=True)
        if self.fd is not None:
            self.thread.start()

    def upto(self, row: int) -> None:
        """Have the bytes up to about ``row`` (and a block beyond) on their way into the page cache."""
        with self.changed:
            self.wanted = self.size * min(row, self.rows) // self.rows + self.BLOCK
            self.changed.notify()

    def _advise(self) -> None:
        """The thread: advise block after block as the reader moves on, until the file's end or the reader closes."""
        for start in range(0, self.size, self.BLOCK):
            with self.changed:
                self.changed.wait_for(lambda start=start: self.closed or start < self.wanted)
                if self.closed:
                    return
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, start, self.BLOCK, os.POSIX_FADV_WILLNEED)  # type: ignore[arg-type]

    def __enter__(self) -> _Readahead:
        return self

    def __exit__(self, *exc: object) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify()
        if self.fd is not None:
            self.thread.join()
            os.close(self.fd)


def write_sharded_marker(folder: Path, names: Sequence[str]) -> dict[str, Any]:
    """Mark ``folder`` as one store made of the complete stores ``folder/<name>`` (the shards of a run, in order):
    layers, shapes and the model are the shards' own (they must agree); rows add up, and a layer any shard
    widened to float32 is float32. Returns the marker written."""
    shards = [ActivationStore(folder / name) for name in names]
    first = shards[0]
    layers: dict[str, Any] = {}
    for layer in first.layers:
        infos = [shard._layer(layer) if layer in shard.layers else None for shard in shards]
        if any(info is None or info["shape"] != infos[0]["shape"] for info in infos):  # type: ignore[index]
            raise StoreError(f"activation store {folder}: its shards do not all hold layer {layer!r} at one shape")
        dtypes = {info["dtype"] for info in infos}  # type: ignore[index]
        layers[layer] = {**infos[0], "rows": sum(info["rows"] for info in infos),  # type: ignore[index]
                         "dtype": "float32" if "float32" in dtypes else "float16"}
    provenance = {**first.provenance, "stimulus_fingerprint": [shard.provenance.get("stimulus_fingerprint")
                                                               for shard in shards]}
    marker = {**first.meta, "layers": layers, "provenance": provenance, "shards": list(names)}
    atomic_write_json(folder / MARKER, marker)
    return marker
