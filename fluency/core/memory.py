"""Handing memory the process no longer uses back to the system, so that long runs stay flat.

Two allocators keep what was freed. Arrow's pool (mimalloc) keeps it after Parquet reads and writes.
glibc's malloc, once large blocks have been freed, raises its mmap threshold and serves later
batch-sized tensors from its heap, which fragments as a measuring pass allocates and frees them:
a 30,000-image run crept ~3 KB per image (peak 1,009 MiB); trimming the heap every 16 batches kept
it flat (peak 968 MiB) at a cost of ~7 ms a call (``docs/benchmarks.md``, 2026-12-05). At 100,000 images
the swings between trims still raised the peak: every 4 batches, 1,010 → 993 MiB (2026-12-06).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

#: batches between two heap trims of a measuring pass (~7 ms a trim; a 64² batch of 32 takes ~100 ms)
TRIM_EVERY = 4


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps after reading and writing Parquet back to the system: merging
    30,000 images' metric parts grew the process by 118 MB, of which 69 MB came back this way."""
    import pyarrow as pa  # here, not at import: the CLI starts without pyarrow

    pa.default_memory_pool().release_unused()


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None on another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def trim_heap() -> bool:
    """Return the free pages of glibc's heap to the system (whole free pages anywhere in the heap, not only
    at its top). Returns whether a trim ran: False where the C library has none."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_memory() -> None:
    """Both of the above, at the end of a step (a table read, an analysis, a report view): what the step freed
    goes back to the system before the next step allocates, so that steps' high-water marks do not stack. The
    analyses of a 100,000-image run kept 88 MiB of freed heap (traced live memory: none) until trimmed."""
    release_arrow_memory()
    trim_heap()


class HeapTrimmer:
    """Calls :func:`trim_heap` every ``every`` ticks: a loop over batches ticks once a batch."""

    def __init__(self, every: int | None = None) -> None:
        self.every = TRIM_EVERY if every is None else every
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % self.every == 0:
            trim_heap()
