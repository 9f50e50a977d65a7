"""Executors for batch evaluation: run one function over many tasks, in-process or on Dask workers.

``local`` runs the tasks in this process, one after another. ``dask`` starts a ``LocalCluster``-like
cluster of worker processes (one per GPU, each with its own ``CUDA_VISIBLE_DEVICES``) or connects to an
existing scheduler; ``slurm`` starts workers in SLURM jobs through dask-jobqueue and scales them with the
work. Every executor yields ``(index, result)`` as tasks finish, retries a task whose function raised or
whose worker died, and reports a task that failed every try as :class:`TaskFailed` instead of stopping.
Dask itself schedules; fluency only submits and collects.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Console

from fluency.core.errors import FluencyError, OptionError, error_text
from fluency.core.run import dask_cluster, slurm

KINDS = ("local", "dask", "slurm")
EXTRA = 'pip install "fluency[dask]"'


@dataclass(frozen=True)
class ExecutorSettings:
    """How a batch run executes its tasks (``--executor``, ``--workers``, ``--scheduler``, ``--threads``,
    ``--retries``, the ``[slurm]`` table and ``--slurm``)."""

    kind: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    threads: int = 1
    retries: int = 2
    slurm: Mapping[str, Any] = field(default_factory=dict)
    #: GPU ids handed one per local Dask worker; None: the GPUs torch sees, () for none
    devices: tuple[str, ...] | None = None

    def check(self) -> None:
        """One-line :class:`OptionError` for a bad value or combination."""
        if self.kind not in KINDS:
            hint = difflib.get_close_matches(str(self.kind), KINDS, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise OptionError(f"--executor {self.kind}: use local, dask or slurm{extra}")
        for name, value, low in (("--workers", self.workers, 1), ("--threads", self.threads, 1),
                                 ("--retries", self.retries, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise OptionError(f"{name} {value}: use a whole number of {low} or more")
        if self.scheduler is not None and self.kind != "dask":
            raise OptionError(f"--scheduler needs --executor dask (not {self.kind})")
        if self.scheduler is not None and self.workers is not None:
            raise OptionError("--scheduler and --workers: an existing scheduler brings its own workers; give one")
        if self.kind == "local" and self.workers is not None:
            raise OptionError("--workers needs --executor dask or slurm (the local executor runs in-process)")
        if self.devices is not None and not all(isinstance(d, str) and d.strip() for d in self.devices):
            raise OptionError(f"GPU ids {list(self.devices)}: each must be a non-empty id such as '0'")
        if self.kind == "slurm":
            slurm.check_slurm(self.slurm)


@dataclass(frozen=True)
class TaskFailed:
    """A task that failed on every try: its key, the last error on one line, and how often it ran."""

    key: str
    error: str
    attempts: int


class Executor(Protocol):
    """Runs a function over tasks and yields ``(index, result or TaskFailed)`` as tasks complete."""

    description: str
    dashboard: str | None

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str]
            ) -> Iterator[tuple[int, Any]]:
        """``fn(task)`` for every task, in completion order; a KeyboardInterrupt cancels what is pending."""
        ...

    def close(self) -> None:
        """Stop the workers this executor started."""
        ...


def _check_tasks(tasks: Sequence[Any], keys: Sequence[str]) -> None:
    if len(tasks) != len(keys) or len(set(keys)) != len(keys):
        raise ValueError("run() needs one distinct key per task")


class LocalExecutor:
    """In this process, one task after another; a task whose function raises is tried again."""

    dashboard: str | None = None

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.description = "local, in-process"

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str]
            ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, fn(task))`` in order; KeyboardInterrupt is never caught."""
        _check_tasks(tasks, keys)
        for index, (task, key) in enumerate(zip(tasks, keys)):
            yield index, self._attempt(fn, task, key)

    def _attempt(self, fn: Callable[[Any], Any], task: Any, key: str) -> Any:
        error = ""
        for _ in range(self.retries + 1):
            try:
                return fn(task)
            except Exception as exc:  # noqa: BLE001 - any error of the task is its result after the last try
                error = error_text(exc)
        return TaskFailed(key, error, self.retries + 1)

    def close(self) -> None:
        """Nothing to stop."""


class DaskExecutor:
    """Tasks submitted to a Dask client: Dask retries errors (``retries``) and reschedules the task of a
    worker that died (the scheduler's ``allowed-failures``)."""

    def __init__(self, client: Any | Future[Any], description: str, retries: int) -> None:
        self._client = client
        self.description = description
        self.retries = retries

    @property
    def client(self) -> Any:
        """The Dask client, once its cluster has started (a local cluster starts in the background)."""
        if isinstance(self._client, Future):
            self._client = self._client.result()
        return self._client

    @property
    def dashboard(self) -> str | None:
        """The dashboard's address, or None where it is not served."""
        return dask_cluster.dashboard_of(self.client)

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str]
            ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result or TaskFailed)`` as tasks complete; pending tasks are cancelled when
        the caller stops early or is interrupted."""
        from distributed import as_completed

        _check_tasks(tasks, keys)
        token = uuid.uuid4().hex  # a key is never reused across runs on a long-lived scheduler
        futures = [self.client.submit(fn, task, key=f"{key}-{token}", retries=self.retries, pure=False)
                   for task, key in zip(tasks, keys)]
        index = {future.key: i for i, future in enumerate(futures)}
        try:
            for future, value in as_completed(futures, with_results=True, raise_errors=False):
                i = index[future.key]
                if future.status in ("error", "cancelled"):  # value: (type, exception, traceback)
                    value = self._failure(keys[i], value[1] if isinstance(value, tuple) else value)
                yield i, value
                future.release()
        finally:
            pending = [future for future in futures if not future.done()]
            if pending:
                self.client.cancel(pending)

    def _failure(self, key: str, exc: BaseException) -> TaskFailed:
        from distributed.scheduler import KilledWorker

        if isinstance(exc, KilledWorker):
            tries = exc.allowed_failures + 1
            return TaskFailed(key, f"worker died {tries} times (killed, out of memory or node lost)", tries)
        return TaskFailed(key, error_text(exc), self.retries + 1)

    def close(self) -> None:
        """Close the client (the cluster is closed by :func:`open_executor`)."""
        if not isinstance(self._client, Future) or self._client.exception() is None:
            self.client.close()


def _need(module: str, kind: str) -> None:
    """A one-line error naming the extra to install when ``module`` is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
        found = False
    if not found:
        raise FluencyError(f"--executor {kind} needs Dask, which is not installed: {EXTRA}")


@contextmanager
def open_executor(settings: ExecutorSettings, console: Console) -> Iterator[Executor]:
    """The executor ``settings`` ask for, open for the ``with`` block and shut down after it (also on
    Ctrl-C). Without Dask installed, ``dask`` and ``slurm`` stop with one line naming the extra."""
    settings.check()
    if settings.kind == "local":
        yield LocalExecutor(settings.retries)
        return
    _need("distributed", settings.kind)
    if settings.kind == "slurm":
        _need("dask_jobqueue", settings.kind)
    import dask
    from distributed import Client

    local = settings.kind == "dask" and settings.scheduler is None
    config = dask_cluster.dask_config(settings, quiet_workers=local)
    with ExitStack() as stack:
        stack.enter_context(dask.config.set(config))
        stack.enter_context(dask_cluster.restored_environment(config["distributed.nanny.pre-spawn-environ"]))
        # on SLURM an sbatch that fails is only logged (as an error): let that through
        level = logging.ERROR if settings.kind == "slurm" else logging.CRITICAL
        stack.enter_context(dask_cluster.quiet_logs(level))
        executor = _connect(settings, console, local, stack, Client)
        stack.callback(executor.close)
        yield executor


def _connect(settings: ExecutorSettings, console: Console, local: bool, stack: ExitStack,
             client_cls: Any) -> DaskExecutor:
    """Start (or reach) the cluster, registering its shutdown on ``stack``, and wrap a client of it. A local
    cluster starts in a background thread: its workers start and import torch while the caller plans."""
    if settings.scheduler is not None:
        try:
            client = client_cls(settings.scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise FluencyError(f"--scheduler {settings.scheduler}: cannot connect ({error_text(exc)})") from None
        dask_cluster.warn_about_workers(client, console, settings.scheduler)
        return DaskExecutor(client, f"dask scheduler {settings.scheduler}", settings.retries)
    if not local:
        cluster, description = dask_cluster.slurm_cluster(settings)
        stack.callback(cluster.close)
        return DaskExecutor(client_cls(cluster), description, settings.retries)
    devices = settings.devices if settings.devices is not None else dask_cluster.local_gpus()
    pool = ThreadPoolExecutor(1, thread_name_prefix="fluency-cluster")
    started = pool.submit(_start_local, settings, devices, client_cls)
    pool.shutdown(wait=False)  # the thread ends with the start
    stack.callback(_close_started, started)
    return DaskExecutor(started, dask_cluster.describe_local(settings, devices), settings.retries)


def _start_local(settings: ExecutorSettings, devices: tuple[str, ...], client_cls: Any) -> Any:
    """A client of a newly started local cluster (the cluster closed again when no client comes of it)."""
    cluster = dask_cluster.local_cluster(settings, devices)
    try:
        return client_cls(cluster)
    except BaseException:
        cluster.close()
        raise


def _close_started(started: Future[Any]) -> None:
    """Close the cluster behind a started client, waiting for the start to end (an interrupt may come first)."""
    if started.exception() is None:  # a failed start leaves no cluster (SpecCluster closes what it began)
        started.result().cluster.close()


def slurm_job_script(settings: ExecutorSettings) -> str:
    """The job script dask-jobqueue submits for these settings; the scheduler's address, known only once
    it runs, is shown as ``tcp://SCHEDULER:8786``. Creates ``log_directory`` if set (as dask-jobqueue does)."""
    _need("dask_jobqueue", "slurm")
    from dask_jobqueue.slurm import SLURMJob

    return SLURMJob(scheduler="tcp://SCHEDULER:8786", name="fluency-worker",
                    **slurm.job_arguments(settings.slurm, settings.threads)).job_script()
