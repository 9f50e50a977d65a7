"""Executors: the local one, a 2-worker Dask cluster (retries, a killed worker, per-worker GPUs, cancelling),
SLURM settings and job scripts (rendered by dask-jobqueue; a fake sbatch runs one job on this machine)."""

from __future__ import annotations

import io
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fluency.core.errors import FluencyError, OptionError
from fluency.core.run import worker_gpu
from fluency.core.run.executors import (ExecutorSettings, LocalExecutor, TaskFailed, open_executor,
                                        slurm_job_script)
from fluency.core.run.slurm import lifetime, slurm_options

QUIET = Console(file=io.StringIO())


def square(x: int) -> int:
    return x * x


def fail_on(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad task {x}")
    return x * x


class Flaky:
    """Raises ``failures`` times, then returns its task."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("flaky")
        return x


def run_all(executor: Any, fn: Any, tasks: list[Any]) -> dict[int, Any]:
    return dict(executor.run(fn, tasks, [f"task-{i}" for i in range(len(tasks))]))


# ---- local ----------------------------------------------------------------------------------------------------

def test_local_runs_every_task_in_order() -> None:
    assert list(LocalExecutor(retries=2).run(square, [1, 2, 3], ["a", "b", "c"])) == [(0, 1), (1, 4), (2, 9)]


def test_local_retries_a_flaky_task() -> None:
    flaky = Flaky(failures=2)
    assert run_all(LocalExecutor(retries=2), flaky, [7]) == {0: 7}
    assert flaky.calls == 3


def test_local_reports_a_task_failed_after_its_retries_and_goes_on() -> None:
    flaky = Flaky(failures=5)
    results = run_all(LocalExecutor(retries=1), flaky, [1])
    assert results == {0: TaskFailed("task-0", "RuntimeError: flaky", 2)} and flaky.calls == 2
    assert run_all(LocalExecutor(retries=0), fail_on, [2, 3, 4]) == {
        0: 4, 1: TaskFailed("task-1", "ValueError: bad task 3", 1), 2: 16}


def test_local_lets_keyboard_interrupt_through_at_once() -> None:
    calls = []

    def interrupted(x: int) -> int:
        calls.append(x)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_all(LocalExecutor(retries=2), interrupted, [1, 2])
    assert calls == [1]


def test_open_executor_local_needs_no_dask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with open_executor(ExecutorSettings(), QUIET) as executor:
        assert executor.description == "local, in-process" and executor.dashboard is None
        assert run_all(executor, square, [4]) == {0: 16}


# ---- settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (ExecutorSettings(kind="dusk"), "did you mean 'dask'"),
    (ExecutorSettings(kind="dask", workers=0), "--workers 0: use a whole number of 1 or more"),
    (ExecutorSettings(kind="dask", threads=0), "--threads 0"),
    (ExecutorSettings(retries=-1), "--retries -1"),
    (ExecutorSettings(kind="local", scheduler="tcp://h:8786"), "--scheduler needs --executor dask"),
    (ExecutorSettings(kind="dask", scheduler="tcp://h:8786", workers=2), "give one"),
    (ExecutorSettings(kind="local", workers=2), "--workers needs --executor dask or slurm"),
    (ExecutorSettings(kind="slurm", slurm={"partiton": "gpu"}), "did you mean 'partition'"),
    (ExecutorSettings(kind="slurm", slurm={"gpus": "two"}), "[slurm].gpus: expected int"),
    (ExecutorSettings(kind="slurm", slurm={"walltime": "2 hours"}), "is not a duration"),
    (ExecutorSettings(kind="slurm", slurm={"walltime": "01:00:00", "lifetime": "2h"}), "shorter than the walltime"),
    (ExecutorSettings(kind="slurm", slurm={"memory": "lots"}), "is not a size"),
    (ExecutorSettings(kind="slurm", slurm={"partition": "a", "queue": "b"}), "give one"),
])
def test_bad_settings_are_one_line(settings: ExecutorSettings, message: str) -> None:
    with pytest.raises(OptionError) as caught:
        settings.check()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_slurm_options_merge_the_table_and_the_command_line() -> None:
    import tomllib

    table = tomllib.loads('[slurm]\npartition = "cpu"\nwalltime = 02:00:00\nprologue = ["module load a"]\n')["slurm"]
    merged = slurm_options(table, ["partition=gpu", "gpus=2", "prologue=module load cuda", "prologue=echo a,b"])
    assert merged == {"partition": "gpu", "walltime": table["walltime"], "gpus": 2,
                      "prologue": ["module load cuda", "echo a,b"]}
    ExecutorSettings(kind="slurm", slurm=merged).check()  # an unquoted TOML time is a walltime
    with pytest.raises(OptionError, match="expected KEY=VALUE"):
        slurm_options({}, ["partition"])
    with pytest.raises(OptionError, match="slurm must be a table"):
        slurm_options("gpu", [])


@pytest.mark.parametrize("walltime, given, expected", [
    ("01:00:00", None, (3240, 180)),  # margin a tenth: 6 min → lifetime 54m, stagger 3m
    ("00:06:00", None, (180, 90)),  # under 10 minutes: half
    ("1-00:00:00", None, (86400 - 900, 450)),  # at most 15 minutes
    ("02:00:00", "100m", (6000, 600)),
])
def test_worker_lifetime_ends_before_the_walltime(walltime: str, given: str | None, expected: tuple) -> None:
    assert lifetime({"walltime": walltime, "lifetime": given}) == expected


def test_missing_dask_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(FluencyError, match=r'pip install "fluency\[dask\]"'):
        with open_executor(ExecutorSettings(kind="dask", workers=1), QUIET):
            pass
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(FluencyError, match=r'--executor slurm needs Dask.*pip install "fluency\[dask\]"'):
        slurm_job_script(ExecutorSettings(kind="slurm"))


def test_a_slurm_table_in_a_config_file_is_not_taken_for_a_plugin(tmp_path: Path) -> None:
    from fluency.core.plugin.config import read_config, resolve_plugin_options
    from fluency.core.plugin.manager import PluginManager

    path = tmp_path / "cluster.toml"
    path.write_text('[slurm]\npartition = "gpu"\ngpus = 2\n\n[gini]\nlayers = ["conv1"]\n', encoding="utf-8")
    config = read_config(path)
    resolved = resolve_plugin_options(PluginManager(autoload=False), [("metric", "gini")], [], config)
    assert resolved[("metric", "gini")]["layers"] == ["conv1"]
    assert slurm_options(config["slurm"]) == {"partition": "gpu", "gpus": 2}
    with pytest.raises(OptionError, match="names no known plugin"):  # other unknown tables still refused
        resolve_plugin_options(PluginManager(autoload=False), [], [], {"slurmm": {"partition": "gpu"}})


# ---- SLURM job scripts ----------------------------------------------------------------------------------------

def test_the_slurm_job_script_has_the_expected_directives(tmp_path: Path) -> None:
    settings = ExecutorSettings(kind="slurm", threads=2, slurm={
        "partition": "gpu_p2", "account": "abc@v100", "walltime": "02:00:00", "cores": 8, "memory": "32GiB",
        "gpus": 2, "prologue": ["module purge", "module load cuda/12.1", "source ~/venv/bin/activate"],
        "job_directives_skip": ["-n 1"], "job_extra_directives": ["--qos=qos_gpu-t3"],
        "log_directory": str(tmp_path / "logs"), "local_directory": "$JOBSCRATCH"})
    script = slurm_job_script(settings)
    lines = script.splitlines()
    directives = [line for line in lines if line.startswith("#SBATCH")]
    for expected in ("#SBATCH -p gpu_p2", "#SBATCH -A abc@v100", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=8",
                     "#SBATCH --mem=32G", "#SBATCH --gres=gpu:2", "#SBATCH --qos=qos_gpu-t3", "#SBATCH -J fluency",
                     f"#SBATCH -o {tmp_path / 'logs'}/fluency-%J.out"):
        assert expected in directives, (expected, directives)
    assert "#SBATCH -n 1" not in directives
    prologue = [lines.index(line) for line in settings.slurm["prologue"]]
    assert prologue == sorted(prologue) and "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in lines
    assert lines.index("export OMP_NUM_THREADS=2") < prologue[0]
    worker = lines[-1]
    for part in ("--nworkers 2", "--nthreads 1", "--memory-limit 16.00GiB", "--lifetime 108m",
                 "--lifetime-stagger 6m", "--preload fluency.core.run.worker_gpu", "--local-directory $JOBSCRATCH"):
        assert part in worker, (part, worker)


def test_each_worker_of_a_multi_gpu_job_keeps_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_gpu.gpu_for("fluency-3-1", "4,6") == "6"
    assert worker_gpu.gpu_for("fluency-3-0", "4,6") == "4"
    assert worker_gpu.gpu_for("fluency-3-1", "") == "1"
    assert worker_gpu.gpu_for("fluency", "4,6") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a1,GPU-b2")
    worker_gpu.dask_setup(type("Worker", (), {"name": "fluency-0-1"})())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-b2"


# ---- a 2-worker Dask cluster ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_executor() -> Any:
    settings = ExecutorSettings(kind="dask", workers=2, threads=2, retries=2, devices=("3", "5"))
    with open_executor(settings, QUIET) as executor:
        yield executor


def environment(x: float) -> tuple[int, str, str, bool]:
    """What a task sees: its worker's pid, GPU and thread settings, and whether it may start processes."""
    import multiprocessing

    time.sleep(x)
    return (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", ""), os.environ.get("OMP_NUM_THREADS", ""),
            multiprocessing.current_process().daemon)


def malloc_trim(_: int) -> str | None:
    """The worker's MALLOC_TRIM_THRESHOLD_: Dask's nanny sets 65536, which slows torch's allocations 1.6x."""
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_dask_gives_the_same_results_as_local(dask_executor: Any) -> None:
    assert dask_executor.description == "dask LocalCluster, 2 workers × 2 thread(s), GPUs 3,5"
    tasks = list(range(12))
    assert run_all(dask_executor, square, tasks) == run_all(LocalExecutor(retries=2), square, tasks)


def test_each_dask_worker_has_its_own_gpu(dask_executor: Any) -> None:
    seen = run_all(dask_executor, environment, [0.3] * 6).values()
    gpu_of = {pid: gpu for pid, gpu, _, _ in seen}
    assert len(gpu_of) == 2 and sorted(gpu_of.values()) == ["3", "5"]
    assert {(threads, daemonic) for _, _, threads, daemonic in seen} == {("2", False)}
    assert set(run_all(dask_executor, malloc_trim, [0, 1, 2, 3]).values()) == {None}


def fail_counted(job: tuple[str, int]) -> int:
    """:func:`fail_on`, writing a line per try of the failing task."""
    if job[1] == 3:
        with open(job[0], "a", encoding="utf-8") as tries:
            tries.write("try\n")
    return fail_on(job[1])


def test_a_task_failing_every_try_is_reported_and_the_rest_complete(dask_executor: Any, tmp_path: Path) -> None:
    tries = tmp_path / "tries.txt"
    results = run_all(dask_executor, fail_counted, [(str(tries), x) for x in (1, 2, 3, 4)])
    assert results == {0: 1, 1: 4, 2: TaskFailed("task-2", "ValueError: bad task 3", 3), 3: 16}
    assert tries.read_text().count("try") == 3  # retries = 2, so three tries


def test_keyboard_interrupt_cancels_the_pending_tasks(dask_executor: Any) -> None:
    def consume() -> None:
        for _ in dask_executor.run(time.sleep, [0.4] * 8, [f"nap-{i}" for i in range(8)]):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        consume()
    client = dask_executor.client
    deadline = time.monotonic() + 5
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0


def victim(job: tuple[str, int]) -> int:
    """Task 0 writes its worker's pid and waits to be killed; run again, it finishes."""
    pid_file, x = Path(job[0]), job[1]
    if x == 0 and not pid_file.exists():
        pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
        pid_file.with_suffix(".tmp").rename(pid_file)
        time.sleep(30)
    time.sleep(0.05)
    return x * 10


def test_a_killed_worker_costs_only_its_task(dask_executor: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "victim.pid"

    def kill_the_victim() -> None:
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_victim)
    killer.start()
    start = time.monotonic()
    results = run_all(dask_executor, victim, [(str(pid_file), x) for x in range(6)])
    killer.join()
    assert results == {x: x * 10 for x in range(6)} and time.monotonic() - start < 20


# ---- a SLURM job on this machine ------------------------------------------------------------------------------

FAKE_SBATCH = """#!/bin/bash
# runs a copy of the job script here (dask-jobqueue deletes its own), with the two GPUs SLURM would list
job=$(mktemp "$FAKE_SLURM/job-XXXXXX")
cp "$1" "$job"
CUDA_VISIBLE_DEVICES=7,9 setsid bash "$job" > "$job.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""
FAKE_SCANCEL = """#!/bin/bash
for job in "$@"; do kill -TERM -- "-$job" 2>/dev/null; done
exit 0
"""


def test_a_slurm_job_runs_one_worker_per_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the workers unpickle this file's functions
    settings = ExecutorSettings(kind="slurm", workers=1, slurm={
        "gpus": 2, "memory": "2GiB", "walltime": "00:10:00", "local_directory": str(tmp_path / "scratch")})
    with open_executor(settings, QUIET) as executor:
        assert executor.description.startswith("SLURM via dask-jobqueue, up to 1 job(s) × 2 worker(s)")
        seen = run_all(executor, environment, [0.3] * 6).values()
        trims = set(run_all(executor, malloc_trim, [0, 1, 2, 3]).values())
    assert sorted({gpu for _, gpu, _, _ in seen}) == ["7", "9"] and trims == {None}
    assert {daemonic for *_, daemonic in seen} == {False}


def test_the_cluster_page_shows_the_job_script_of_its_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/cluster.md's ``[slurm]`` example and the job script it prints agree with the code."""
    import re
    import tomllib

    page = (Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text(encoding="utf-8")
    table = tomllib.loads(re.search(r"```toml\n(.*?)```", page, flags=re.DOTALL).group(1))["slurm"]
    shown = re.search(r"```text\n(.*?)```", page, flags=re.DOTALL).group(1)
    threads = int(re.search(r"with `--threads (\d+)`, each job runs this script", page).group(1))
    monkeypatch.chdir(tmp_path)  # the example's log_directory is created where the script is rendered
    assert slurm_job_script(ExecutorSettings(kind="slurm", threads=threads, slurm=slurm_options(table))) == shown
