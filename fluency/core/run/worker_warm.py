"""Dask worker preload: a worker imports torch and fluency's unit code while it starts, not in its first task.

Importing them takes ~1.5 s on a 2-core machine. A local cluster starts in the background while the run is
planned (:func:`fluency.core.run.executors.open_executor`), so this cost overlaps the planning instead of
delaying the first task. Loaded with ``dask worker --preload fluency.core.run.worker_warm``.
"""

from __future__ import annotations

from typing import Any


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in the worker process before it takes tasks."""
    import fluency.core.run.units  # noqa: F401 - torch, the model, the metrics' machinery
