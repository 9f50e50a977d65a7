"""Dask worker preload for a SLURM job with several GPUs: each worker process gets one of them.

SLURM lists a job's GPUs in ``CUDA_VISIBLE_DEVICES`` (``--gres=gpu:2`` → ``0,1``, or the node's ids of
the job's GPUs). ``dask worker --nworkers N`` names its processes ``NAME-0`` … ``NAME-(N-1)``; process
``i`` keeps the ``i``-th listed GPU only, before anything in it has initialised CUDA, so two tasks never
share a GPU by accident. Loaded with ``dask worker --preload fluency.core.run.worker_gpu``.
"""

from __future__ import annotations

import os
from typing import Any


def gpu_for(worker_name: str, visible: str) -> str | None:
    """The GPU id for the worker process called ``worker_name`` (``…-i``) among the ``visible`` ids
    (``0,1``); the index itself when none are listed, and None for a name without an index."""
    index = str(worker_name).rpartition("-")[2]
    if not index.isdigit():
        return None
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    return ids[int(index) % len(ids)] if ids else index


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in the worker process before its first task."""
    gpu = gpu_for(worker.name, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
