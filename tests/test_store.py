"""The Parquet activation store, the metric table and the atomic write helpers."""

from __future__ import annotations

import json
import os
import threading
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fluency.core.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from fluency.core.errors import StoreError
from fluency.core.run import store as store_module
from fluency.core.run.store import (
    FORMAT_VERSION,
    MARKER,
    ActivationStore,
    ActivationStoreWriter,
)
from fluency.core.run.tables import MetricTableWriter, read_metric_table

PROVENANCE = {"fluency_version": "0.1", "plugin_versions": {"gini": "fluency 0.1"}, "checkpoint_sha256": "ab" * 32,
              "stimulus_fingerprint": "cd" * 16, "preprocessing": {"size": 32, "channels": 1}, "seed": 7}
SHAPES = {"enc1": (4, 8, 8), "enc2": (16,), "mu": (3,)}


def _write(path, dtype, n=23, batch=5, rows_per_group=4, seed=0):
    """Write ``n`` images in batches (numpy and torch inputs alternating); return ids and the data written."""
    rng = np.random.default_rng(seed)
    ids = [f"img-{i:03d}" for i in range(n)]
    data = {layer: rng.standard_normal((n, *shape)).astype(np.float32) for layer, shape in SHAPES.items()}
    with ActivationStoreWriter(path, dtype=dtype, rows_per_group=rows_per_group, provenance=PROVENANCE) as w:
        for k, start in enumerate(range(0, n, batch)):
            for layer, values in data.items():
                chunk = values[start:start + batch].copy()
                w.write(layer, ids[start:start + batch], torch.from_numpy(chunk) if k % 2 else chunk)
                chunk[:] = np.nan  # the writer must have copied what it keeps
    return ids, data


def test_round_trip_float32_exact(tmp_path):
    ids, data = _write(tmp_path / "s", "float32")
    store = ActivationStore(tmp_path / "s")
    assert sorted(store.layers) == sorted(SHAPES)
    assert store.provenance == PROVENANCE
    for layer, shape in SHAPES.items():
        assert store.shape(layer) == shape
        assert store.dtype(layer) == np.float32
        assert store.num_rows(layer) == len(ids)
        got_ids, values = store.read_layer(layer)
        assert got_ids == ids
        assert values.dtype == np.float32 and values.shape == (len(ids), *shape)
        np.testing.assert_array_equal(values, data[layer])


def test_round_trip_float16_and_row_groups(tmp_path):
    ids, data = _write(tmp_path / "s", "float16", n=23, rows_per_group=4)
    store = ActivationStore(tmp_path / "s")
    for layer in SHAPES:
        assert store.dtype(layer) == np.float16
        batches = list(store.iter_batches(layer, batch_size=6))
        assert [len(b) for b, _ in batches] == [6, 6, 6, 5]
        got = np.concatenate([v for _, v in batches])
        assert [i for b, _ in batches for i in b] == ids
        np.testing.assert_allclose(got.astype(np.float32), data[layer], rtol=1e-3, atol=1e-4)
        assert not np.array_equal(got.astype(np.float32), data[layer])  # really stored as float16
        meta = pq.ParquetFile(tmp_path / "s" / f"{layer}.parquet")
        assert meta.metadata.num_row_groups == 6  # ceil(23 / 4)
        field = meta.schema_arrow.field("activation")
        assert field.type == pa.binary(int(np.prod(SHAPES[layer])) * 2)
        assert json.loads(field.metadata[b"shape"]) == list(SHAPES[layer])
        assert field.metadata[b"dtype"] == b"float16"
        column = meta.metadata.row_group(0).column(1)
        assert column.compression == "UNCOMPRESSED" and not column.is_stats_set
    marker = json.loads((tmp_path / "s" / MARKER).read_text())
    assert marker["format"] == "fluency-activation-store" and marker["format_version"] == FORMAT_VERSION
    assert marker["layers"]["enc2"] == {"shape": [16], "dtype": "float16", "rows": 23, "file": "enc2.parquet"}
    assert not list((tmp_path / "s").glob("*.partial"))


def test_batches_are_zero_copy_views(tmp_path):
    _write(tmp_path / "s", "float16", n=10, rows_per_group=4)
    store = ActivationStore(tmp_path / "s")
    for _, values in store.iter_batches("enc1", batch_size=3):
        assert not values.flags.owndata
        base = values
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, pa.Buffer)  # the memory belongs to Arrow
        assert base.address <= values.ctypes.data < base.address + base.size

    seen = []
    original = ActivationStore.iter_batches

    def spy(self, layer, batch_size=256):
        for ids, values in original(self, layer, batch_size):
            seen.append(values)
            yield ids, values

    store.iter_batches = spy.__get__(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = [t for _, t in store.iter_torch("enc1", batch_size=3)]
    assert len(tensors) == len(seen) == 4
    for t, values in zip(tensors, seen):
        assert t.dtype == torch.float16 and tuple(t.shape) == values.shape
        assert t.data_ptr() == values.ctypes.data


@pytest.mark.parametrize("read_bytes", [1, 700, 2**24])
def test_reads_of_any_size_give_the_same_batches(tmp_path, monkeypatch, read_bytes):
    """Batches are cut from reads of several batches (READ_BYTES), never across a read: the same batches, ids,
    values and zero-copy views whatever the read size and the row groups; read_layer is one writable array."""
    ids, data = _write(tmp_path / "s", "float32", n=23, rows_per_group=4)
    _write(tmp_path / "old", "float32", n=23, rows_per_group=128)  # the writer's layout before reads grew
    monkeypatch.setattr(store_module, "READ_BYTES", read_bytes)
    for path in (tmp_path / "s", tmp_path / "old"):
        store = ActivationStore(path)
        batches = list(store.iter_batches("enc1", batch_size=5))
        assert [len(b) for b, _ in batches] == [5, 5, 5, 5, 3]
        assert [i for b, _ in batches for i in b] == ids
        np.testing.assert_array_equal(np.concatenate([v for _, v in batches]), data["enc1"])
        assert all(not v.flags.owndata for _, v in batches)
        got_ids, values = store.read_layer("enc1")
        assert got_ids == ids and values.flags.writeable
        np.testing.assert_array_equal(values, data["enc1"])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no readahead thread without posix_fadvise")
def test_readahead_stops_with_the_reader(tmp_path, monkeypatch):
    """A reader left after its first batch ends its readahead thread and closes the file when it is closed."""
    _write(tmp_path / "s", "float16", n=23, rows_per_group=4)
    monkeypatch.setattr(store_module, "READ_BYTES", 1)  # reads of one batch, advised 64 bytes at a time
    monkeypatch.setattr(store_module._Readahead, "BLOCK", 64)
    batches = ActivationStore(tmp_path / "s").iter_batches("enc1", batch_size=5)
    next(batches)
    assert any(t.name == "readahead enc1.parquet" for t in threading.enumerate())
    batches.close()
    assert not any(t.name.startswith("readahead") for t in threading.enumerate())


def test_float16_input_is_checked_on_its_bits(tmp_path):
    """float16 activations (a half-precision model) are checked without numpy's slow float16 reductions: the
    largest float16 stays float16, NaN or ±inf names its image."""
    values = np.array([[1.5, -65504.0], [0.0, 2.0**-24]], np.float16)
    with ActivationStoreWriter(tmp_path / "s", provenance=PROVENANCE) as w:
        w.write("a", ["x", "y"], values)
        for bad in (np.inf, -np.inf, np.nan):
            with pytest.raises(StoreError, match="NaN or infinite activations for image 'q'"):
                w.write("a", ["p", "q"], np.array([[1, 2], [3, bad]], np.float16))
    store = ActivationStore(tmp_path / "s")
    assert store.dtype("a") == np.float16 and "widened" not in store.meta["layers"]["a"]
    np.testing.assert_array_equal(store.read_layer("a")[1], values)


def test_exception_inside_with_leaves_incomplete_store(tmp_path):
    with pytest.raises(RuntimeError):
        with ActivationStoreWriter(tmp_path / "s", provenance=PROVENANCE, rows_per_group=2) as w:
            w.write("enc1", ["a", "b", "c"], np.ones((3, 2)))
            raise RuntimeError("boom")
    assert not (tmp_path / "s" / MARKER).exists()
    with pytest.raises(StoreError, match="incomplete") as err:
        ActivationStore(tmp_path / "s")
    assert str(tmp_path / "s") in str(err.value) and "interrupted" in str(err.value)


def test_writer_never_closed_is_incomplete(tmp_path):
    w = ActivationStoreWriter(tmp_path / "s", provenance=PROVENANCE, rows_per_group=2)
    w.write("enc1", ["a", "b", "c", "d", "e"], np.ones((5, 2)))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "s")
    w.close()
    assert ActivationStore(tmp_path / "s").num_rows("enc1") == 5


def test_missing_folder_and_unknown_format(tmp_path):
    with pytest.raises(StoreError, match="no such folder"):
        ActivationStore(tmp_path / "nope")
    _write(tmp_path / "s", "float32", n=3)
    marker = tmp_path / "s" / MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(StoreError, match="newer than this fluency reads"):
        ActivationStore(tmp_path / "s")
    marker.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(StoreError, match="unknown format"):
        ActivationStore(tmp_path / "s")
    marker.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="no layer 'dec9'"):
        ActivationStore(tmp_path / "s").shape("dec9")
    (tmp_path / "s" / "enc1.parquet").unlink()
    with pytest.raises(StoreError, match="enc1.parquet is missing"):
        next(ActivationStore(tmp_path / "s").iter_batches("enc1"))


def test_shape_change_is_an_error(tmp_path):
    with ActivationStoreWriter(tmp_path / "s", provenance=PROVENANCE) as w:
        w.write("enc1", ["a", "b"], np.zeros((2, 4, 3)))
        with pytest.raises(StoreError, match="'enc1'.*shape changed"):
            w.write("enc1", ["c"], np.zeros((1, 3, 4)))
        with pytest.raises(StoreError, match="image ids"):
            w.write("enc1", ["c", "d"], np.zeros((1, 4, 3)))
        w.write("enc1", ["c"], np.zeros((1, 4, 3)))
    assert ActivationStore(tmp_path / "s").read_layer("enc1")[0] == ["a", "b", "c"]


def test_overwrite_protection(tmp_path):
    _write(tmp_path / "s", "float32", n=4)
    with pytest.raises(StoreError, match="already exists"):
        ActivationStoreWriter(tmp_path / "s", provenance=PROVENANCE)
    assert ActivationStore(tmp_path / "s").num_rows("enc1") == 4  # untouched
    with ActivationStoreWriter(tmp_path / "s", provenance={"seed": 1}, overwrite=True) as w:
        w.write("other", ["x"], np.ones((1, 2)))
    store = ActivationStore(tmp_path / "s")
    assert store.layers == ["other"] and store.provenance == {"seed": 1}
    assert not (tmp_path / "s" / "enc1.parquet").exists()  # old layer files are gone


def test_metric_table_round_trip(tmp_path):
    path = tmp_path / "metrics.parquet"
    with MetricTableWriter(path, "run-1", rows_per_group=3) as table:
        table.write("ck1", "gini", "enc1", ["a", "b"], np.array([0.5, 0.25]))
        table.write("ck1", "loss", None, ["a", "b"], torch.tensor([1.0, 2.0]).numpy())
        table.write("ck2", "gini", "enc1", ["a"], [3.0])
        assert not path.exists() and path.with_name("metrics.parquet.partial").exists()
    assert path.exists() and not path.with_name("metrics.parquet.partial").exists()
    df = read_metric_table(path)
    assert list(df.columns) == ["image_id", "checkpoint", "metric", "layer", "value", "run_id", "plugin",
                                "plugin_version", "options_hash"]
    assert df["image_id"].tolist() == ["a", "b", "a", "b", "a"]
    assert df["value"].tolist() == [0.5, 0.25, 1.0, 2.0, 3.0]
    assert df["layer"].isna().tolist() == [False, False, True, True, False]
    assert set(df["run_id"]) == {"run-1"} and df["checkpoint"].tolist()[-1] == "ck2"
    assert pq.read_schema(path).field("layer").nullable


def test_metric_table_keeps_partial_on_exception(tmp_path):
    path = tmp_path / "metrics.parquet"
    with pytest.raises(RuntimeError):
        with MetricTableWriter(path, "run-1") as table:
            table.write("ck1", "gini", "enc1", ["a", "b"], [0.5, 0.25])
            raise RuntimeError("boom")
    assert not path.exists()
    partial = path.with_name("metrics.parquet.partial")
    assert pq.read_table(partial).column("value").to_pylist() == [0.5, 0.25]
    with pytest.raises(StoreError, match="interrupted"):
        read_metric_table(path)


def test_atomic_helpers(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.tmp-")
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    atomic_write_json(tmp_path / "a.json", {"path": tmp_path, "n": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"path": str(tmp_path), "n": 1}
    atomic_write_bytes(target, b"\x00new")
    assert target.read_bytes() == b"\x00new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out.txt"]
