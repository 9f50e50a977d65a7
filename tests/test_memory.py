"""Memory stays flat in the number of images (issue 16): the metric table is buffered in arrays allocated
once, the bootstrap draws its resamples in blocks with the same draws as all at once, and a measuring
pass gives glibc's free heap pages back every few batches."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

import fluency.plugins.default_correlation as correlation
from fluency.core import memory
from fluency.core.run.tables import MetricTableWriter, read_metric_table


def _write_batches(writer: MetricTableWriter, start: int, batches: int) -> None:
    for b in range(start, start + batches):
        ids = [f"img-{b * 32 + i}" for i in range(32)]
        for layer in ("enc1", "enc2", None):
            writer.write("default", "gini", layer, ids, np.full(32, b, dtype=np.float64))


def test_metric_table_buffers_rows_without_arrow_objects_per_batch(tmp_path) -> None:
    """Between row groups, writing a batch allocates no Arrow memory (one small table per batch and metric,
    kept until the row group was full, grew glibc's heap by ~60 KB per image in a run)."""
    with MetricTableWriter(tmp_path / "m.parquet", "run", plugin="gini", plugin_version="1",
                           options_hash="abc") as writer:
        _write_batches(writer, 0, 10)
        before = pa.total_allocated_bytes()
        _write_batches(writer, 10, 500)  # 48,000 rows: less than a row group
        assert pa.total_allocated_bytes() - before < 64 * 1024
        assert writer.buffered == 510 * 96
    table = read_metric_table(tmp_path / "m.parquet")
    assert len(table) == 510 * 96 and table["image_id"].iloc[-1] == "img-16319"
    assert table["layer"].isna().sum() == 510 * 32 and (table["plugin"] == "gini").all()


def test_metric_table_row_groups_split_batches_in_order(tmp_path) -> None:
    """A batch that fills the row group continues in the next one: every row once, in the order written."""
    with MetricTableWriter(tmp_path / "m.parquet", "run", rows_per_group=50) as writer:
        _write_batches(writer, 0, 7)
    table = read_metric_table(tmp_path / "m.parquet")
    assert len(table) == 7 * 96
    expected = [(f"img-{b * 32 + i}", layer) for b in range(7) for layer in ("enc1", "enc2", None) for i in range(32)]
    layers = [None if pd.isna(layer) else layer for layer in table["layer"]]
    assert list(zip(table["image_id"], layers)) == expected
    assert table["value"].tolist() == [float(b) for b in range(7) for _ in range(96)]


def _one_call(x: np.ndarray, y: np.ndarray, rank: bool, n_boot: int, level: float,
              rng: np.random.Generator) -> tuple[float, float]:
    """The bootstrap interval with every resample drawn in one call (the computation before blocks)."""
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    bx, by = x[idx], y[idx]
    if rank:
        bx, by = stats.rankdata(bx, axis=1), stats.rankdata(by, axis=1)
    r = correlation._rowwise_pearson(bx, by)
    lo, hi = np.quantile(r[np.isfinite(r)], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@pytest.mark.parametrize("n", [5, 97, 400])
@pytest.mark.parametrize("rank", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_in_blocks_draws_as_one_call(monkeypatch, n: int, rank: bool, ties: bool) -> None:
    """Blocks of resamples give bit-identical intervals, and leave the generator where one call would (the next
    test of the run draws on); Spearman's ranks, counted per resample, are scipy's average ranks, ties too."""
    monkeypatch.setattr(correlation, "BOOT_BLOCK", 7 * n)  # blocks of 6 resamples; odd n: odd counts per row
    g = np.random.default_rng(n)
    x, y = g.normal(size=n), g.normal(size=n)
    if ties:
        x, y = np.round(x, 1), np.round(y)
    blocks, whole = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(2):
        assert correlation.bootstrap_ci(x, y, rank, 301, 0.95, blocks) == _one_call(x, y, rank, 301, 0.95, whole)
    assert blocks.integers(0, 2 ** 40) == whole.integers(0, 2 ** 40)


def test_bootstrap_memory_does_not_grow_with_the_images() -> None:
    """1000 resamples of 20,000 images held ~10 arrays of 1000 × 20,000 values (~1.6 GB) at once; in blocks the
    peak is a few arrays of BOOT_BLOCK values, whatever the number of images."""
    g = np.random.default_rng(0)
    peaks = []
    for n in (2_000, 20_000):
        x, y = g.normal(size=n), g.normal(size=n)
        tracemalloc.start()
        try:
            correlation.bootstrap_ci(x, y, True, 1000, 0.95, np.random.default_rng(0))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 16 * correlation.BOOT_BLOCK * 8  # a few blocks of float64/int64, not n_boot × n
    assert peaks[1] < 1.5 * peaks[0]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(memory._malloc_trim() is None, reason="glibc's malloc_trim only")
def test_trim_heap_returns_free_pages_inside_the_heap() -> None:
    """Blocks freed below a live one cannot shrink the heap's top: only a trim gives their pages back.
    Allocated with the C library's own malloc, so nothing but glibc's heap is measured."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 * 1024, 1600  # 100 MiB of heap blocks (under glibc's smallest mmap threshold)
    blocks = [libc.malloc(block) for _ in range(count)]
    pin = libc.malloc(block)
    for address in blocks:
        ctypes.memset(address, 1, block)  # touched: resident
    try:
        for address in blocks:
            libc.free(address)
        freed = _rss_bytes()
        assert memory.trim_heap()
        assert freed - _rss_bytes() > 0.5 * block * count
    finally:
        libc.free(pin)


def test_heap_trimmer_trims_every_nth_tick(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    trimmer = memory.HeapTrimmer(every=16)
    for _ in range(40):
        trimmer.tick()
    assert len(calls) == 2
    monkeypatch.setattr(memory, "TRIM_EVERY", 3)
    assert memory.HeapTrimmer().every == 3
