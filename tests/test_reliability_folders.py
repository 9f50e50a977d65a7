"""Nothing lost that fluency did not write; an honest status after an interruption; one exit-code table.

A run folder is a fluency run only with fluency's marker (``.fluency-run``); ``--overwrite`` removes only
the files the previous run recorded in its ledger (``.fluency-ledger``), after the new run is validated;
one writer at a time holds ``.fluency-lock`` (host, pid, heartbeat). SIGTERM stops a run like Ctrl-C,
and a SIGKILLed run reads as incomplete, not running. The exit codes are those of docs/user-guide.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from rich.console import Console

import fluency
from fluency.core.errors import FluencyError
from fluency.core.inputs import demo
from fluency.core.outputs.report import build_report

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "run-v1"
LOCK = ".fluency-lock"


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight generated, rated 32×32 images."""
    return demo.export(tmp_path_factory.mktemp("stimuli"), n=8, size=32, seed=2)


def small_run(stimuli: Path, out: Path, metrics: tuple[str, ...] = ("gini",), **settings):
    return fluency.run(metrics=list(metrics), images=stimuli / "images", ratings=stimuli / "ratings.csv", out=out,
                       batch_size=4, progress=False, **settings)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256 of its bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_lock(folder: Path, pid: int, heartbeat_age: float = 0.0) -> None:
    beat = datetime.now(timezone.utc) - timedelta(seconds=heartbeat_age)
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "command": "fluency run",
                                           "started": beat.isoformat(), "heartbeat": beat.isoformat()}))


def dead_pid() -> int:
    """The id of a process that has ended and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- what --overwrite removes -------------------------------------------------------------------------------


def test_overwrite_removes_only_what_the_previous_run_wrote(stimuli: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    small_run(stimuli, out)
    build_report(out)
    assert (out / "figures" / "heatmap-pearson.png").exists() and (out / "report.html").exists()
    mine = {"figures/heatmap-annotated.png": b"\x89PNG my annotations", "analyses/notes.md": b"# what I saw\n",
            "notes.txt": b"mine", "metrics/README": b"how I read the parts"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    second = small_run(stimuli, out, metrics=("hoyer",), overwrite=True, report=False)
    assert {name: (out / name).read_bytes() for name in mine} == mine
    assert not list((out / "metrics").glob("gini-*")) and set(second.metrics["plugin"]) == {"hoyer", "image-stats"}
    assert not (out / "report.html").exists() and not (out / "figures" / "heatmap-pearson.png").exists()
    assert (out / "analyses" / "pearson.parquet").exists() and (out / "figures" / "recon-default.png").exists()
    assert second.manifest["status"] == "complete"


@pytest.mark.parametrize("typo", ["metric", "layer", "missing checkpoint", "not a checkpoint"])
def test_a_rerun_that_fails_validation_keeps_the_previous_results(stimuli: Path, tmp_path: Path, typo: str) -> None:
    out = tmp_path / "run"
    small_run(stimuli, out, store=False)
    before = snapshot(out)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    settings = {"metric": {"metrics": ("ginni",)}, "layer": {"layers": ["enc9"]},
                "missing checkpoint": {"checkpoints": [tmp_path / "modles" / "final.pt"]},
                "not a checkpoint": {"checkpoints": [tmp_path / "notes.pt"]}}[typo]
    with pytest.raises(FluencyError):
        small_run(stimuli, out, overwrite=True, store=False, **settings)
    assert snapshot(out) == before


def test_a_folder_with_a_strangers_manifest_is_not_a_run(stimuli: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "figures").mkdir(parents=True)
    (site / "manifest.json").write_text(json.dumps({"name": "My web app", "start_url": "/", "status": "complete"}))
    (site / "figures" / "logo.png").write_bytes(b"\x89PNG logo")
    (site / "index.html").write_text("<h1>hello</h1>")
    before = snapshot(site)
    with pytest.raises(FluencyError, match="not a fluency run"):
        small_run(stimuli, site, overwrite=True)
    with pytest.raises(FluencyError, match="not a fluency run"):
        build_report(site)
    with pytest.raises(FluencyError, match="not a fluency run"):
        fluency.measure(site, ["gini"], progress=False)
    assert snapshot(site) == before


def test_a_run_of_an_earlier_fluency_is_read_but_not_overwritten(stimuli: Path, tmp_path: Path) -> None:
    """The version-1 fixture has a manifest and no marker: report reads it; --overwrite cannot tell its files
    from the user's and refuses."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    before = snapshot(old)
    with pytest.raises(FluencyError, match="earlier fluency"):
        small_run(stimuli, old, overwrite=True)
    assert snapshot(old) == before
    page = build_report(old).read_text()
    assert "Status: <b>complete</b>" in page


# -- one writer at a time -------------------------------------------------------------------------------------


def test_a_live_lock_refuses_every_writer_and_a_stale_one_is_taken_over(stimuli: Path, tmp_path: Path,
                                                                       capsys) -> None:
    out = tmp_path / "run"
    small_run(stimuli, out)
    write_lock(out, os.getpid())  # alive: this process, a fresh heartbeat
    before = snapshot(out)
    for attempt in (lambda: small_run(stimuli, out, overwrite=True), lambda: small_run(stimuli, out),
                    lambda: fluency.measure(out, ["hoyer"], progress=False), lambda: build_report(out)):
        with pytest.raises(FluencyError, match="in use by fluency run"):
            attempt()
    assert snapshot(out) == before
    write_lock(out, os.getpid(), heartbeat_age=600)  # stale: its heartbeat stopped ten minutes ago
    small_run(stimuli, out, metrics=("hoyer",), overwrite=True, console=Console(stderr=True))
    assert "stale lock" in capsys.readouterr().err and not (out / LOCK).exists()
    write_lock(out, dead_pid())  # stale: its process is gone on this host
    build_report(out)
    assert "is gone" in capsys.readouterr().err and not (out / LOCK).exists()


def test_the_lock_beats_while_held_and_releases_only_itself(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from fluency.core.run import lock
    from fluency.core.run.importing import import_store

    monkeypatch.setattr(lock, "HEARTBEAT", 0.05)
    held = lock.FolderLock(tmp_path, "fluency test")
    with held:
        first = lock.read_holder(tmp_path)
        time.sleep(1.2)  # heartbeats are written to the second
        assert lock.read_holder(tmp_path).heartbeat > first.heartbeat and first.pid == os.getpid()
        write_lock(tmp_path, os.getpid())  # another writer took it over: the first one stops beating, keeps it
    assert (tmp_path / LOCK).exists() and lock.read_holder(tmp_path).token == ""
    store = tmp_path / "store"
    store.mkdir()
    write_lock(store, os.getpid())
    np.savez(tmp_path / "acts.npz", enc=np.ones((2, 3), np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\n")
    with pytest.raises(FluencyError, match="in use by fluency run"):
        import_store(tmp_path / "acts.npz", tmp_path / "ids.txt", store)


def test_a_ledger_entry_never_reaches_outside_the_run(stimuli: Path, tmp_path: Path) -> None:
    """A hand-edited ledger naming ``..``, absolute paths or a path through a symbolic link removes nothing there."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    small_run(stimuli, out, store=False, figures=False)
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("precious")
    (tmp_path / "victim.txt").write_text("precious")
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    with (out / ".fluency-ledger").open("a") as ledger:
        for entry in ("../victim.txt", str(tmp_path / "victim.txt"), "link/thesis.tex", "link/", "notes.txt"):
            ledger.write(json.dumps(entry) + "\n")
        ledger.write('"torn')  # a killed writer's half line
    small_run(stimuli, out, overwrite=True, store=False, figures=False)
    assert (tmp_path / "victim.txt").read_text() == "precious" == (elsewhere / "thesis.tex").read_text()
    assert (out / "link").is_symlink()


# -- interruptions --------------------------------------------------------------------------------------------


def start_run(out: Path) -> subprocess.Popen[str]:
    """``fluency run`` on the embedded default, one image per batch (so it is still measuring when signalled)."""
    env = {**os.environ, "COLUMNS": "200", "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen([sys.executable, "-m", "fluency.cli", "run", "--metric", "gini", "--batch-size", "1",
                             "--no-figures", "--no-report", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_until_measuring(proc: subprocess.Popen[str], out: Path) -> None:
    """Until gini's part exists, then half a second more: several one-image batches are finished by then (the
    part file appears just before its first rows, so a signal at that instant would leave it empty)."""
    deadline = time.monotonic() + 120
    while not list(out.glob("units/default/all/metrics/gini-*.parquet.partial")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run was not measuring when it was to be signalled: {proc.communicate()}")
        time.sleep(0.02)
    time.sleep(0.5)


def test_sigterm_marks_the_run_interrupted_and_keeps_what_it_finished(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_run(out)
    wait_until_measuring(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "SIGTERM" in manifest["error"]
    (line,) = [line.strip() for line in stderr.splitlines() if line.startswith("interrupted")]
    assert line.startswith("interrupted (SIGTERM): finished results are kept") and "Traceback" not in stderr
    assert line in (ROOT / "docs" / "user-guide.md").read_text()  # the message is the one the guide shows
    (partial,) = out.glob("units/default/all/metrics/gini-*.parquet.partial")
    assert pq.read_table(partial).num_rows > 0 and not (out / LOCK).exists()


def test_a_killed_run_reads_as_incomplete_and_its_files_alone_are_overwritten(stimuli: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_run(out)
    wait_until_measuring(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # what it wrote last
    with pytest.raises(FluencyError, match="incomplete"):
        fluency.measure(out, ["hoyer"], progress=False)
    page = build_report(out).read_text()
    assert "Status: <b>incomplete</b>" in page and "process" in page and "is gone" in page
    (out / "analyses").mkdir(exist_ok=True)
    (out / "analyses" / "notes.md").write_text("the killed run")
    small_run(stimuli, out, overwrite=True, store=False)
    assert (out / "analyses" / "notes.md").read_text() == "the killed run"
    assert not list(out.rglob("*.partial")) and not (out / "activations").exists()


# -- train --out, demo export, --out inside --images ----------------------------------------------------------


def test_train_and_demo_export_never_overwrite_a_users_file(stimuli: Path, tmp_path: Path, manager) -> None:
    from fluency.core.train.training import TrainConfig, train

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.toml").write_text("# my settings\n")
    settings = {"images": str(stimuli / "images"), "out": str(out), "epochs": 1, "batch_size": 4, "image_size": 32,
                "figures": False, "options": ["vae-small.latent_dim=4"]}
    with pytest.raises(FluencyError, match="config.toml"):
        train(TrainConfig(**settings), manager=manager)
    assert (out / "config.toml").read_text() == "# my settings\n" and not (out / "final.pt").exists()
    train(TrainConfig(**settings), manager=manager, overwrite=True)
    assert (out / "final.pt").exists() and "[train]" in (out / "config.toml").read_text()

    folder = tmp_path / "study"
    (folder / "images").mkdir(parents=True)
    (folder / "ratings.csv").write_text("image_id,rating\nmine,7\n")
    with pytest.raises(FluencyError, match="ratings.csv"):
        demo.export(folder, n=3, size=16)
    assert (folder / "ratings.csv").read_text() == "image_id,rating\nmine,7\n"
    assert not list((folder / "images").iterdir())
    demo.export(folder, n=3, size=16, overwrite=True)
    assert len(pd.read_csv(folder / "ratings.csv")) == 3


def test_an_out_folder_inside_the_images_is_refused(stimuli: Path, tmp_path: Path, manager) -> None:
    import shutil

    from fluency.core.train.training import TrainConfig, train

    images = tmp_path / "images"
    shutil.copytree(stimuli / "images", images)
    with pytest.raises(FluencyError, match="inside --images"):
        fluency.run(metrics=["gini"], images=images, out=images / "run", progress=False)
    with pytest.raises(FluencyError, match="inside --images"):
        train(TrainConfig(images=str(images), out=str(images / "model"), epochs=1, image_size=32, figures=False),
              manager=manager)
    assert sorted(p.name for p in images.iterdir()) == sorted(p.name for p in (stimuli / "images").iterdir())


# -- exit codes -----------------------------------------------------------------------------------------------


def main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run ``fluency ARGS`` in this process through the entry point; its exit status."""
    from fluency.cli import main as entry

    monkeypatch.setattr(sys, "argv", ["fluency", *args])
    monkeypatch.setenv("FLUENCY_DISABLE_PLUGIN_AUTOLOAD", "1")
    try:
        entry()
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def test_exit_codes(stimuli: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """0 done, 2 a user error, 3 a plugin failure, 130 Ctrl-C (143 SIGTERM: above); a bug keeps its traceback."""
    common = ("--images", str(stimuli / "images"), "--ratings", str(stimuli / "ratings.csv"), "--no-report",
              "--no-figures", "--no-store", "--batch-size", "4")
    assert main(monkeypatch, "run", "--metric", "gini", "--out", str(tmp_path / "ok"), *common) == 0
    assert main(monkeypatch, "run", "--metric", "ginni", "--out", str(tmp_path / "typo"), *common) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "typo").exists()

    from fluency.core.run import units
    from fluency.plugins.default_hoyer import Hoyer

    monkeypatch.setattr(Hoyer, "compute", lambda self, batch: 1 / 0)
    assert main(monkeypatch, "run", "--metric", "hoyer", "--out", str(tmp_path / "plugin"), *common) == 3
    assert "plugin error:" in capsys.readouterr().err

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(units, "measure_checkpoint", ctrl_c)
    assert main(monkeypatch, "run", "--metric", "gini", "--out", str(tmp_path / "int"), *common) == 130
    assert "interrupted (SIGINT): finished results are kept" in " ".join(capsys.readouterr().err.split())
    assert json.loads((tmp_path / "int" / "manifest.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "int" / LOCK).exists()

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(units, "measure_checkpoint", bug)  # an unexpected error: retried, then reported
    assert main(monkeypatch, "run", "--metric", "gini", "--out", str(tmp_path / "bug"), *common) == 1
    assert "RuntimeError: a bug (3 tries)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the entry point restores the handler
