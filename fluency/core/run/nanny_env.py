"""Dask nanny preload for SLURM jobs: the worker processes start without ``MALLOC_TRIM_THRESHOLD_``.

Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker it spawns (its default
``distributed.nanny.pre-spawn-environ``). Any explicit value turns off glibc's dynamic mmap threshold, so
torch's large allocations (a batch's activations) are mapped and faulted in anew every batch: a unit of
work ran 1.6× slower (16.0 s instead of 10.0 s on 4,000 images, 2 cores; docs/benchmarks.md). The local
cluster unsets it through Dask's configuration (:func:`fluency.core.run.dask_cluster.dask_config`); a job's
nanny reads its own configuration, which an environment variable cannot unset, so this preload removes it.
Loaded with ``dask worker --preload-nanny fluency.core.run.nanny_env``.
"""

from __future__ import annotations

from typing import Any

VARIABLE = "MALLOC_TRIM_THRESHOLD_"


def dask_setup(nanny: Any) -> None:
    """Dask's nanny preload hook, run before the nanny spawns its worker process."""
    for environment in (getattr(nanny, "pre_spawn_env", None), getattr(nanny, "env", None)):
        if isinstance(environment, dict):
            environment.pop(VARIABLE, None)
