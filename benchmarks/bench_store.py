"""Activation store speed against numpy's own files, as ratios measured in the same run.

    python benchmarks/bench_store.py [--repeats 5] [--cases enc2,wide] [--dtypes float16,float32] [--json]

Each case is one layer of random activations (``enc2``: vae-small's second encoder layer at 64×64, 2,000
images × 32×32×32; ``wide``: 500 images × 64×56×56), stored as float16 and as float32:

- write: :class:`ActivationStoreWriter` fed batches of 32 images of the stored dtype (as a run writes
  them), closed (which fsyncs), against ``np.save`` of the same array followed by an fsync;
- read: ``ActivationStore.iter_batches``, ``read_layer`` and ``metric_batches`` against ``np.load``, each
  followed by a float32 sum of every batch of 256 images (a metric's read of every byte; the whole-array
  readers sum the same 256-image slices), warm (pages cached) and cold (every file's pages evicted
  first with ``posix_fadvise(DONTNEED)`` after an fsync; needs no root).

The measurements alternate within each repeat, so that background load hits baseline and store alike,
and the best of ``--repeats`` is kept. Prints GB/s and the ratio to the numpy baseline (above 1: the
store is faster) and, with ``--json``, the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from fluency.core.run.store import ActivationStore, ActivationStoreWriter

#: case → (shape of one image's activations, images)
CASES = {"enc2": ((32, 32, 32), 2000), "wide": ((64, 56, 56), 500)}
WRITE_BATCH, READ_BATCH = 32, 256


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only, hence the fsync)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def chunked_sum(values: np.ndarray) -> float:
    """The float32 sum of ``values``, 256 images at a time (bounded temporary memory, as a metric reads)."""
    return sum(float(values[i:i + READ_BATCH].sum(dtype=np.float32)) for i in range(0, len(values), READ_BATCH))


def np_save(path: Path, data: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, data)
        fh.flush()
        os.fsync(fh.fileno())


def store_write(path: Path, data: np.ndarray, rows_per_group: int | None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    ids = [f"image{i:06d}" for i in range(len(data))]
    options = {} if rows_per_group is None else {"rows_per_group": rows_per_group}
    with ActivationStoreWriter(path, dtype=data.dtype.name, provenance={}, **options) as writer:
        for start in range(0, len(data), WRITE_BATCH):
            writer.write("layer", ids[start:start + WRITE_BATCH], data[start:start + WRITE_BATCH])


def readers(npy: Path, store: Path) -> dict[str, Callable[[], float]]:
    """Label → a read of every value followed by its float32 sum; the first is the baseline."""
    def np_load() -> float:
        return chunked_sum(np.load(npy))

    def iter_batches() -> float:
        return sum(float(v.sum(dtype=np.float32)) for _, v in ActivationStore(store).iter_batches("layer", READ_BATCH))

    def read_layer() -> float:
        return chunked_sum(ActivationStore(store).read_layer("layer")[1])

    def metric_batches() -> float:
        batches = ActivationStore(store).metric_batches(None, READ_BATCH)
        return sum(float(b.activations["layer"].numpy().sum(dtype=np.float32)) for b in batches)  # numpy's sum

    return {"np.load": np_load, "iter_batches": iter_batches, "read_layer": read_layer,
            "metric_batches": metric_batches}


def best_times(steps: dict[str, Callable[[], object]], repeats: int,
               before: Callable[[], None] = lambda: None) -> dict[str, float]:
    """The best seconds of each step over ``repeats`` rounds that run every step in turn (``before`` each)."""
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            before()
            t0 = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - t0)
    return {label: min(values) for label, values in times.items()}


def measure_case(folder: Path, shape: tuple[int, ...], images: int, dtype: str, repeats: int,
                 rows_per_group: int | None) -> dict[str, dict[str, float]]:
    """GB/s and ratio to numpy of every write and read of one layer."""
    data = np.random.default_rng(0).normal(size=(images, *shape)).astype(dtype)
    npy, store = folder / "layer.npy", folder / "store"
    write = best_times({"np.save": lambda: np_save(npy, data),
                        "ActivationStoreWriter": lambda: store_write(store, data, rows_per_group)}, repeats)
    reads = readers(npy, store)
    expected = chunked_sum(data)
    assert all(np.isclose(read(), expected, rtol=1e-3) for read in reads.values()), "a reader read other values"
    files = [npy, *store.glob("*.parquet")]
    results = {"write": write, "read warm": best_times(reads, repeats),
               "read cold": best_times(reads, repeats, before=lambda: evict(files))}
    return {f"{kind}: {label}": {"GB/s": data.nbytes / seconds / 1e9, "ratio": times[next(iter(times))] / seconds}
            for kind, times in results.items() for label, seconds in times.items()}


def figures(quick: bool = False, smoke: bool = False) -> list[dict[str, object]]:
    """The rows of ``python -m benchmarks``: each write and read against its numpy baseline. Full: both cases,
    5 repeats; ``quick``: ``enc2``, 3 repeats; ``smoke``: 64 images of 8×8×8, once."""
    cases = {"tiny": ((8, 8, 8), 64)} if smoke else {"enc2": CASES["enc2"]} if quick else CASES
    repeats = 1 if smoke else 3 if quick else 5
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (shape, images) in cases.items():
            for dtype in ("float16", "float32"):
                result = measure_case(Path(tmp), shape, images, dtype, repeats, None)
                for kind in ("write", "read warm", "read cold"):
                    steps = {k.split(": ", 1)[1]: v for k, v in result.items() if k.startswith(f"{kind}: ")}
                    (base, base_row), *stored = steps.items()
                    rows += [{"name": f"{kind}, {label} ({case} {dtype}, {images} images)", "value": row["GB/s"],
                              "unit": "GB/s", "baseline": base, "baseline_value": base_row["GB/s"],
                              "ratio": row["ratio"], "target": "≥ 0.5×" if kind == "write" else "≥ 1×"}
                             for label, row in stored]
    return rows


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'case':<30}{'step':<36}{'GB/s':>8}{'× numpy':>9}"]
    for case, rows in results.items():
        lines += [f"{case:<30}{step:<36}{row['GB/s']:>8.2f}{row['ratio']:>9.2f}" for step, row in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--rows-per-group", type=int, default=None, help="the writer's (default: its own)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for case in args.cases.split(","):
            shape, images = CASES[case]
            for dtype in args.dtypes.split(","):
                label = f"{case} {dtype} {images}×{'×'.join(map(str, shape))}"
                results[label] = measure_case(Path(tmp), shape, images, dtype, args.repeats, args.rows_per_group)
                print(table({label: results[label]}).split("\n", 1)[1] if results.keys() - {label} else
                      table({label: results[label]}), flush=True)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, pyarrow {pa.__version__}")
    if args.json:
        print(json.dumps({"results": results, "repeats": args.repeats, "machine": platform.machine(),
                          "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
