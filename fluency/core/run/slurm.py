"""SLURM settings for the ``slurm`` executor: the ``[slurm]`` table, ``--slurm KEY=VALUE`` and the job script.

Workers reach SLURM through dask-jobqueue's ``SLURMCluster``; this module turns fluency's few keys into
its arguments. Dask workers run one task at a time (one Dask thread each); ``--threads`` is the torch
thread count inside a worker, so a job asks for ``workers per job × threads`` CPUs unless ``cores`` says.
A job with ``gpus = N`` runs N worker processes, and the preload :mod:`fluency.core.run.worker_gpu`
gives each of them one of the job's GPUs.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fluency.core.errors import OptionError
from fluency.core.plugin.options import Option, brief_repr, parse_value, resolve_options

SLURM_OPTIONS: dict[str, Option] = {
    "partition": Option("str", help="partition (#SBATCH -p)"),
    "queue": Option("str", help="another name for partition"),
    "account": Option("str", help="account charged for the jobs (#SBATCH -A)"),
    "walltime": Option("str", "01:00:00", help="time limit of each job, HH:MM:SS or D-HH:MM:SS (#SBATCH -t)"),
    "cores": Option("int", minimum=1, help="CPUs per job (--cpus-per-task); default workers per job × --threads"),
    "memory": Option("str", help="memory per job, e.g. 32GiB (--mem); default 8GiB per worker"),
    "gpus": Option("int", 0, minimum=0, help="GPUs per job (--gres=gpu:N); one worker process per GPU"),
    "prologue": Option("list[str]", [], help="shell lines before the workers start, e.g. module load cuda"),
    "job_directives_skip": Option("list[str]", [], help="#SBATCH lines containing any of these are left out"),
    "job_extra_directives": Option("list[str]", [], help="more #SBATCH directives, e.g. --qos=normal"),
    "max_jobs": Option("int", 4, minimum=1, help="the most jobs at once (--workers overrides)"),
    "local_directory": Option("str", help="node-local scratch folder for the workers"),
    "log_directory": Option("str", help="folder for the jobs' stdout and stderr files"),
    "python": Option("str", help="Python on the compute nodes; default the one running fluency"),
    "interface": Option("str", help="network interface of scheduler and workers, e.g. ib0"),
    "lifetime": Option("str", help="workers retire after this (e.g. 50m); default walltime minus a margin"),
}
#: keys that take several lines; each ``--slurm KEY=LINE`` adds one
LIST_KEYS = tuple(key for key, option in SLURM_OPTIONS.items() if option.type == "list[str]")
#: the preload that pins one GPU per worker process of a multi-GPU job
GPU_PRELOAD = "fluency.core.run.worker_gpu"
#: the nanny preload that starts workers without Dask's MALLOC_TRIM_THRESHOLD_ (fluency.core.run.nanny_env)
NANNY_PRELOAD = "fluency.core.run.nanny_env"
#: set in every job before the user's prologue: non-daemonic workers (a DataLoader with workers can
#: start processes), no Dask memory pausing or spilling (results are small; torch owns the memory)
JOB_ENVIRONMENT = {
    "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False",
}
_WALLTIME = re.compile(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})")
_DURATION = re.compile(r"(\d+)\s*([smh])")
_MEMORY = re.compile(r"\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]?)?")


def slurm_options(table: Any, assignments: Sequence[str] = ()) -> dict[str, Any]:
    """A ``[slurm]`` table of a config file with ``--slurm KEY=VALUE`` over it (these win).

    Values of a list key (``prologue``…) from the command line are one line each and together replace
    the table's list. Nothing is validated here; :func:`check_slurm` does that.
    """
    if table is not None and not isinstance(table, Mapping):
        raise OptionError("--config: slurm must be a table like [slurm]")
    merged: dict[str, Any] = dict(table or {})
    lines: dict[str, list[str]] = {}
    for text in assignments:
        key, sep, raw = text.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise OptionError(f"--slurm {text!r}: expected KEY=VALUE (e.g. --slurm partition=gpu)")
        if key in LIST_KEYS:
            lines.setdefault(key, []).append(raw)
        else:
            declared = SLURM_OPTIONS.get(key)
            merged[key] = raw if declared is None or declared.type == "str" else parse_value(raw)
    return {**merged, **lines}


def seconds(text: str, where: str) -> int:
    """``HH:MM:SS``, ``D-HH:MM:SS`` or ``50m``/``2h``/``90s`` as seconds; anything else is one line."""
    clock = _WALLTIME.fullmatch(text.strip())
    if clock:
        days, hours, minutes, secs = (int(g or 0) for g in clock.groups())
        return ((days * 24 + hours) * 60 + minutes) * 60 + secs
    short = _DURATION.fullmatch(text.strip())
    if short:
        return int(short.group(1)) * {"s": 1, "m": 60, "h": 3600}[short.group(2)]
    raise OptionError(f"{where}: {brief_repr(text)} is not a duration; write HH:MM:SS, D-HH:MM:SS or e.g. 50m")


def _as_text(value: Any) -> Any:
    """An unquoted TOML time (``walltime = 02:00:00``) as the text SLURM expects."""
    return value.strftime("%H:%M:%S") if isinstance(value, datetime.time) else value


def check_slurm(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of :data:`SLURM_OPTIONS` with its validated value; one line for the first problem."""
    given = {key: _as_text(value) for key, value in options.items()}
    values = resolve_options(SLURM_OPTIONS, [given], "[slurm]")
    if values["partition"] and values["queue"] and values["partition"] != values["queue"]:
        raise OptionError("[slurm]: partition and queue name the same thing; give one")
    values["partition"] = values["partition"] or values.pop("queue")
    values.pop("queue", None)
    walltime = seconds(values["walltime"], "[slurm].walltime")
    if walltime < 60:
        raise OptionError(f"[slurm].walltime: {values['walltime']} is under a minute")
    if values["memory"] is not None and not _MEMORY.fullmatch(values["memory"].strip()):
        raise OptionError(f"[slurm].memory: {brief_repr(values['memory'])} is not a size; write e.g. 32GiB")
    if values["lifetime"] is not None and seconds(values["lifetime"], "[slurm].lifetime") >= walltime:
        raise OptionError(f"[slurm].lifetime: {values['lifetime']} must be shorter than the walltime "
                          f"{values['walltime']} (workers must retire before SLURM kills them)")
    return values


def lifetime(values: Mapping[str, Any]) -> tuple[int, int]:
    """``(lifetime, stagger)`` in seconds: workers retire between lifetime ± stagger, before the walltime.

    By default the margin is a tenth of the walltime, at least 5 and at most 15 minutes (half the
    walltime for jobs under 10 minutes); the stagger is half the margin, so workers of a job do not all
    retire at once and none outlives the job.
    """
    walltime = seconds(values["walltime"], "[slurm].walltime")
    if values["lifetime"] is not None:
        life = seconds(values["lifetime"], "[slurm].lifetime")
    else:
        life = walltime - min(max(walltime // 10, 300), 900, walltime // 2)
    return life, (walltime - life) // 2


def _duration(secs: int) -> str:
    return f"{secs // 60}m" if secs % 60 == 0 else f"{secs}s"


def worker_environment(threads: int) -> dict[str, str]:
    """Environment of a worker process: its BLAS/OpenMP threads match torch's."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def processes_per_job(values: Mapping[str, Any], threads: int) -> int:
    """Worker processes in one job: one per GPU, else ``cores // threads`` (at least one)."""
    if values["gpus"]:
        return values["gpus"]
    return max(1, (values["cores"] or threads) // threads)


def job_arguments(options: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """Keyword arguments of dask-jobqueue's ``SLURMCluster``/``SLURMJob`` for these settings."""
    values = check_slurm(options)
    processes = processes_per_job(values, threads)
    life, stagger = lifetime(values)
    environment = {**JOB_ENVIRONMENT, **worker_environment(threads)}
    extra_args = ["--lifetime", _duration(life), "--lifetime-stagger", _duration(stagger),
                  "--preload-nanny", NANNY_PRELOAD]
    if values["gpus"] > 1:
        extra_args += ["--preload", GPU_PRELOAD]
    arguments = {
        "queue": values["partition"], "account": values["account"], "walltime": values["walltime"],
        "cores": processes, "processes": processes,  # one Dask thread per worker: one task at a time
        "job_cpu": values["cores"] or processes * threads,
        "memory": values["memory"] or f"{8 * processes}GiB",
        "job_name": "fluency",
        "job_extra_directives": [*([f"--gres=gpu:{values['gpus']}"] if values["gpus"] else []),
                                 *values["job_extra_directives"]],
        "job_directives_skip": values["job_directives_skip"],
        "job_script_prologue": [*(f"export {k}={v}" for k, v in environment.items()), *values["prologue"]],
        "worker_extra_args": extra_args,
        "local_directory": values["local_directory"], "log_directory": values["log_directory"],
        "python": values["python"], "interface": values["interface"],
    }
    return {key: value for key, value in arguments.items() if value is not None}


def describe(options: Mapping[str, Any], threads: int, max_jobs: int) -> str:
    """One line for the manifest: jobs, workers, threads, GPUs and partition."""
    values = check_slurm(options)
    gpus = f", {values['gpus']} GPU(s) per job" if values["gpus"] else ""
    where = f", partition {values['partition']}" if values["partition"] else ""
    return (f"SLURM via dask-jobqueue, up to {max_jobs} job(s) × {processes_per_job(values, threads)} "
            f"worker(s) × {threads} thread(s){gpus}{where}, walltime {values['walltime']}")
