"""Starting the Dask side of an executor: a cluster of local worker processes (one per GPU, each with its
own environment), a SLURMCluster, and the configuration, logging and environment they run under."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fluency.core.errors import FluencyError
from fluency.core.run import slurm

if TYPE_CHECKING:
    from fluency.core.run.executors import ExecutorSettings

#: the worker preload that imports torch and fluency while the worker starts (fluency.core.run.worker_warm)
WARM = "fluency.core.run.worker_warm"


def local_gpus() -> tuple[str, ...]:
    """The GPU ids torch sees here (``CUDA_VISIBLE_DEVICES``' entries when set); torch imported only now."""
    import torch

    count = torch.cuda.device_count()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return tuple(visible[:count]) if len(visible) >= count else tuple(str(i) for i in range(count))


def dask_config(settings: ExecutorSettings, quiet_workers: bool) -> dict[str, Any]:
    """Dask configuration while the executor is open: workers are non-daemonic (a DataLoader with workers
    can start processes inside a task), deaths count against ``retries``, no memory pausing or spilling."""
    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc return freed memory at once: torch then maps and
    # faults in every batch's activations anew (a unit ran 1.6x slower on 2 cores, docs/benchmarks.md); unset
    spawn_env: dict[str, Any] = {"MALLOC_TRIM_THRESHOLD_": None, **slurm.worker_environment(settings.threads)}
    if quiet_workers:  # read when the worker process imports distributed, before any nanny env applies
        spawn_env["DASK_LOGGING__DISTRIBUTED"] = "critical"
    return {
        "distributed.worker.daemon": False,
        "distributed.scheduler.allowed-failures": settings.retries,
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.profile.enabled": False,  # its 10-ms stack sampling slowed a task ~5 % on 2 cores
        "distributed.nanny.pre-spawn-environ": spawn_env,
    }


def has_dashboard() -> bool:
    """Dask serves its dashboard only with bokeh installed."""
    return importlib.util.find_spec("bokeh") is not None


def dashboard_of(client: Any) -> str | None:
    """The dashboard's address, or None where it is not served."""
    return client.dashboard_link if has_dashboard() else None


def local_workers(settings: ExecutorSettings, devices: tuple[str, ...]) -> int:
    """How many worker processes a local cluster gets: ``--workers``, else one per GPU, else one per
    ``--threads`` cores."""
    return settings.workers or len(devices) or max(1, (os.cpu_count() or 1) // settings.threads)


def describe_local(settings: ExecutorSettings, devices: tuple[str, ...]) -> str:
    """The description of a local cluster, as recorded in the manifest."""
    gpus = f", GPUs {','.join(devices)}" if devices else ""
    return f"dask LocalCluster, {local_workers(settings, devices)} workers × {settings.threads} thread(s){gpus}"


def local_cluster(settings: ExecutorSettings, devices: tuple[str, ...]) -> Any:
    """A started cluster of worker processes on this machine, each with its own environment (its GPU in
    ``CUDA_VISIBLE_DEVICES``), importing torch and fluency as it starts (:data:`WARM`)."""
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.worker_memory import parse_memory_limit

    workers = local_workers(settings, devices)
    dashboard = has_dashboard()
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": dashboard,
                                                "dashboard_address": ":0" if dashboard else None}}
    memory = parse_memory_limit("auto", 1, workers, logger=logging.getLogger("distributed"))

    def worker(i: int) -> dict[str, Any]:
        env = slurm.worker_environment(settings.threads)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        return {"cls": Nanny, "options": {"host": "127.0.0.1", "nthreads": 1, "env": env, "preload": [WARM],
                                          "memory_limit": memory, "dashboard": False}}

    return SpecCluster(scheduler=scheduler, workers={i: worker(i) for i in range(workers)}, name="fluency",
                       silence_logs=False)


def slurm_cluster(settings: ExecutorSettings) -> tuple[Any, str]:
    """A SLURMCluster that submits up to ``max_jobs`` jobs as work waits, and its description."""
    from dask_jobqueue import SLURMCluster

    if shutil.which("sbatch") is None:
        raise FluencyError("--executor slurm: sbatch is not on PATH; run fluency on the cluster's login node")
    arguments = slurm.job_arguments(settings.slurm, settings.threads)
    max_jobs = settings.workers or slurm.check_slurm(settings.slurm)["max_jobs"]
    options = {"dashboard_address": ":0", "dashboard": has_dashboard()}
    cluster = SLURMCluster(scheduler_options=options, silence_logs=False, **arguments)
    cluster.adapt(minimum_jobs=0, maximum_jobs=max_jobs)
    return cluster, slurm.describe(settings.slurm, settings.threads, max_jobs)


@contextmanager
def quiet_logs(level: int) -> Iterator[None]:
    """Dask's log lines below ``level`` (a worker restarted, a result recomputed) stay off the terminal."""
    names = [name for name in ("distributed", "dask_jobqueue", *logging.root.manager.loggerDict)
             if name.split(".")[0] in ("distributed", "dask_jobqueue")]
    loggers = [logging.getLogger(name) for name in dict.fromkeys(names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, saved in zip(loggers, levels):
            logger.setLevel(saved)


@contextmanager
def restored_environment(names: Iterable[str]) -> Iterator[None]:
    """Dask's nanny writes its pre-spawn variables into this process's environment: undo that."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def warn_about_workers(client: Any, console: Console, address: str) -> None:
    """A line when an existing cluster has no workers yet, or daemonic ones (a DataLoader with workers
    then fails inside a task)."""
    daemonic = client.run(lambda: __import__("multiprocessing").current_process().daemon)
    if not daemonic:
        console.print(f"[yellow]note[/]: the scheduler at {address} has no workers yet; tasks wait for some")
    elif any(daemonic.values()):
        console.print("[yellow]warning[/]: its Dask workers are daemonic; start them with "
                      "DASK_DISTRIBUTED__WORKER__DAEMON=False so a DataLoader with workers runs in a task")
