"""Batch evaluation: units of work per (checkpoint × shard), resume, reuse keyed by what determines a part,
whole-set metrics over shards, many checkpoints from globs, folders and lists, unloadable ones skipped.

Oracles: an unsharded, uninterrupted run of the same settings (results must be identical), and counts of the
units' receipts on disk (what a rerun may reuse)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fluency
from fluency.core.errors import FluencyError

from cli_env import fluency_cli

KEYS = ["checkpoint", "metric", "layer", "image_id"]
FAST = dict(progress=False, figures=False, report=False, covariates=False, analyses=[])


def perturbed(path: Path, seed: int) -> Path:
    """The shipped model with seeded weight noise: a distinct checkpoint of the same architecture."""
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
    from fluency.core.plugin.manager import PluginManager

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False))
    info = {k: v for k, v in loaded.info.items() if k not in ("format", "format_version", "architecture")}
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.2 * p.std().nan_to_num() * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, loaded.model, "vae-small", **info, note=f"perturbed weights, seed {seed}")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(["a", "b", "c"], 1):
        perturbed(root / name / "final.pt", seed)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """48 small noise images with ratings: cheaper than the embedded 240 where the set's content does not matter."""
    from PIL import Image

    root = tmp_path_factory.mktemp("stimuli")
    rng = np.random.default_rng(1)
    (root / "img").mkdir()
    rows = []
    for i in range(48):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "img" / f"s{i:02d}.png")
        rows.append({"image_id": f"s{i:02d}", "rating": float(rng.normal())})
    pd.DataFrame(rows).to_csv(root / "ratings.csv", index=False)
    return {"images": root / "img", "ratings": root / "ratings.csv"}


def table(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path / "metrics.parquet")[KEYS + ["value"]]
    return frame.sort_values(KEYS, na_position="first").reset_index(drop=True)


def receipts(run: Path) -> list[Path]:
    return sorted(run.glob("units/*/*/unit.json"))


def test_shards_and_the_whole_set_reduce_give_the_unsharded_values(tmp_path: Path, folder: dict[str, Path]) -> None:
    """Typicality needs every image (its finish()): with shards it runs in a whole-set unit after them. At
    float32 the store serves it; at float16 the model runs again. Either way: the unsharded values, exactly."""
    whole = fluency.run(metrics=["gini", "typicality"], out=tmp_path / "one", **folder, **FAST)
    for dtype, from_store in (("float32", 1), ("float16", 0)):
        run = fluency.run(metrics=["gini", "typicality"], out=tmp_path / dtype, shard_size=20, store_dtype=dtype,
                          **folder, **FAST)
        tasks = [u["task"] for u in run.manifest["units"]]
        assert tasks == ["default/shard-0000", "default/shard-0001", "default/shard-0002", "default/whole"]
        assert run.manifest["unit_counts"]["from_store"] == from_store
        pd.testing.assert_frame_equal(table(run.path), table(whole.path), check_exact=True)
    store = fluency.open_store(tmp_path / "float32" / "activations" / "default")  # one store of three shards
    assert store.image_ids == [f"s{i:02d}" for i in range(48)] and len(store.shards) == 3
    ids, values = store.read_layer("enc1")
    assert ids == store.image_ids and values.dtype == np.float32
    np.testing.assert_array_equal(values[20:40], fluency.open_store(store.path / "shard-0001").read_layer("enc1")[1])


def test_a_rerun_reuses_every_part_and_an_option_change_remeasures_only_its_metric(tmp_path: Path,
                                                                                  folder: dict[str, Path]) -> None:
    out = tmp_path / "run"
    common = dict(out=out, shard_size=24, **folder, **FAST)
    first = fluency.run(metrics=["gini", "sam"], **common)
    assert first.manifest["unit_counts"] == {"tasks": 2, "computed": 2, "from_store": 0, "reused": 0, "failed": 0}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("units/*/*/metrics/*.parquet")}
    again = fluency.run(metrics=["gini", "sam"], **common)
    assert again.manifest["unit_counts"]["reused"] == 2 and again.manifest["resumed"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    pd.testing.assert_frame_equal(table(out), table(out), check_exact=True)
    changed = fluency.run(metrics=["gini", "sam"], options=["gini.layers=[enc2]"], **common)
    units = changed.manifest["units"]
    assert [u["status"] for u in units] == ["from-store", "from-store"]  # no model pass
    assert all(u["from_store"] == ["gini"] and u["reused"] == ["sam"] for u in units)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the sam parts (and old gini parts) untouched
    gini = changed.metrics[changed.metrics.metric == "gini"]
    assert set(gini.layer) == {"enc2"}
    rho = changed.metrics[changed.metrics.metric.str.startswith("sam")]
    pd.testing.assert_frame_equal(rho.reset_index(drop=True),
                                  first.metrics[first.metrics.metric.str.startswith("sam")].reset_index(drop=True))
    model_option = fluency.run(metrics=["gini", "sam"], options=["gini.layers=[enc2]", "sam.rho=0.1"], **common)
    assert [u["computed"] for u in model_option.manifest["units"]] == [["sam"], ["sam"]]  # only sam runs the model
    forced = fluency.run(metrics=["gini"], force=True, **common)
    assert forced.manifest["unit_counts"]["computed"] == 2


def test_another_run_into_the_same_folder_is_refused_naming_the_differences(tmp_path: Path,
                                                                           folder: dict[str, Path]) -> None:
    out = tmp_path / "run"
    fluency.run(metrics=["gini"], out=out, **folder, **FAST)
    with pytest.raises(FluencyError, match=r"holds another run \(seed: 0 then, 3 now\)"):
        fluency.run(metrics=["gini"], out=out, seed=3, **folder, **FAST)
    with pytest.raises(FluencyError, match="shard_size: None then, 10 now"):
        fluency.run(metrics=["gini"], out=out, shard_size=10, **folder, **FAST)


def test_resume_continues_a_run_from_its_folder_alone(tmp_path: Path, folder: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The run began with relative paths; --resume from another folder finds them (it returns to where the run
    began) and computes only the unit whose receipt is missing."""
    (tmp_path / "img").symlink_to(folder["images"])
    (tmp_path / "r.csv").symlink_to(folder["ratings"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)  # restored after the test, also after --resume's change of folder
    code = fluency_cli(monkeypatch, capsys, "run", "--metric", "gini", "--out", "run", "--shard-size", "16",
                       "--images", "img", "--ratings", "r.csv", "--no-report", "--no-figures", "--seed", "4")[0]
    assert code == 0
    out = tmp_path / "run"
    (out / "units" / "default" / "shard-0001" / "unit.json").unlink()  # as if killed before that unit ended
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = fluency_cli(monkeypatch, capsys, "run", "--resume", "../run", "--no-report", "--no-figures")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 4 and manifest["config"]["shard_size"] == 16
    assert [u["status"] for u in manifest["units"]] == ["reused", "computed", "reused"]
    assert "1 computed" in " ".join(err.split())


def test_a_killed_run_computes_only_the_missing_units_when_run_again(tmp_path: Path, models: Path,
                                                                     folder: dict[str, Path]) -> None:
    """SIGKILL mid-run (no handler can run): the rerun of the same command computes exactly the units without a
    receipt and gives the results of an uninterrupted run."""
    command = [sys.executable, "-m", "fluency.cli", "run", "--metric", "gini", "--checkpoint", str(models),
               "--images", str(folder["images"]), "--ratings", str(folder["ratings"]), "--batch-size", "4",
               "--shard-size", "12", "--no-report", "--no-figures", "--no-covariates", "--out"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*command, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(receipts(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(receipts(out))
    assert 3 <= done < 12, done  # 3 checkpoints × 4 shards
    rerun = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unit_counts"]["computed"] == 12 - done and manifest["unit_counts"]["reused"] == done
    clean = subprocess.run([*command, str(tmp_path / "clean")], capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    pd.testing.assert_frame_equal(table(out), table(tmp_path / "clean"), check_exact=True)


def test_checkpoints_from_globs_folders_and_lists_and_an_unloadable_one_is_skipped(
        tmp_path: Path, models: Path, folder: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    stimuli = ["--images", str(folder["images"]), "--ratings", str(folder["ratings"])]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "final.pt").write_bytes(b"not a checkpoint")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# the models\n{models}/a/final.pt\n\n{models}/*/final.pt  # all of them\nbroken/final.pt\n")
    run = fluency.run(metrics=["gini"], checkpoints_from=listing, out=tmp_path / "r1", **folder, **FAST)
    found = run.manifest["inputs"]["checkpoints"]
    assert [c["label"] for c in found] == ["a", "b", "c"]  # a listed twice: measured once; broken: skipped
    assert all(len(c["sha256"]) == 64 for c in found) and len({c["sha256"] for c in found}) == 3
    assert any(d.get("why") == "unloadable" for d in run.manifest["inputs"]["duplicate_checkpoints"])
    code, _, err = fluency_cli(monkeypatch, capsys, "run", "--metric", "gini", "--checkpoint", str(models),
                               "--checkpoint", "broken", "--out", "r2", "--no-report", "--no-figures", *stimuli)
    assert code == 0 and "broken/final.pt" in err and "skipped" in err
    assert set(pd.read_parquet("r2/metrics.parquet").checkpoint) == {"a", "b", "c"}
    code, _, err = fluency_cli(monkeypatch, capsys, "run", "--metric", "gini", "--checkpoint", f"{models}/*/final.pt",
                               "--checkpoint", "broken", "--fail-fast", "--out", "r3", "--no-report", *stimuli)
    assert code == 2 and "not a fluency checkpoint" in err
    code, _, err = fluency_cli(monkeypatch, capsys, "run", "--metric", "gini", "--checkpoint", "nowhere/*.pt",
                               "--out", "r4")
    assert code == 2 and "--checkpoint nowhere/*.pt: matches no file" in err


def test_match_group_measures_each_image_with_its_own_groups_model_only(tmp_path: Path, models: Path) -> None:
    """Models trained per subgroup (as `fluency train --by sex` lists them in checkpoints.json): with
    --match-group each rated image is measured by its group's model alone, filed under matched-sex, beside the
    general model. Oracle: each group model run on every image, unmatched."""
    from PIL import Image

    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"i{i:02d}.png")
        rows.append({"image_id": f"i{i:02d}", "rating": float(rng.normal()), "sex": "fm"[i % 3 == 0]})
    pd.DataFrame(rows).to_csv(tmp_path / "ratings.csv", index=False)
    groups = tmp_path / "by-sex"
    listing = {"by": ["sex"], "groups": []}
    for value, source in (("f", "a"), ("m", "b")):
        target = groups / f"sex={value}" / "final.pt"
        target.parent.mkdir(parents=True)
        target.write_bytes((models / source / "final.pt").read_bytes())
        listing["groups"].append({"label": f"sex={value}", "group": {"sex": value}, "checkpoint": str(target)})
    (groups / "checkpoints.json").write_text(json.dumps(listing))
    common = dict(images=tmp_path / "img", ratings=tmp_path / "ratings.csv", metrics=["gini"], **FAST)
    paths = [groups / "sex=f" / "final.pt", groups / "sex=m" / "final.pt", DEFAULT_CHECKPOINT]
    run = fluency.run(checkpoints=paths, match_group=["sex"], out=tmp_path / "matched", **common)
    assert set(run.metrics.checkpoint) == {"matched-sex", "default"}
    assert run.manifest["match_group"]["checkpoints"] == {"sex=f": {"sex": "f"}, "sex=m": {"sex": "m"}}
    matched = run.metrics[run.metrics.checkpoint == "matched-sex"]
    assert matched.groupby(["metric", "layer"]).image_id.apply(lambda s: sorted(s)).map(len).eq(24).all()
    every = fluency.run(checkpoints=paths, out=tmp_path / "every", **common).metrics
    sex = dict(zip(pd.DataFrame(rows).image_id, pd.DataFrame(rows).sex))
    expected = every[every.checkpoint == every.image_id.map(lambda i: f"sex={sex[i]}")]
    got = matched.merge(expected, on=["image_id", "metric", "layer"])
    assert len(got) == len(matched) and np.array_equal(got.value_x.to_numpy(), got.value_y.to_numpy())
    with pytest.raises(FluencyError, match="none of the checkpoints was trained on a subgroup"):
        fluency.run(checkpoints=[DEFAULT_CHECKPOINT], match_group=["sex"], out=tmp_path / "x", **common)


def test_the_guides_batch_commands_run_as_written(tmp_path: Path, models: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    text = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text[text.index("## Many checkpoints"):text.index("## Run folders")]
    (block,) = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    (tmp_path / "models").symlink_to(models)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "fluency", command
        code, _, err = fluency_cli(monkeypatch, capsys, *args[1:])
        assert code == 0, (command, err)
    manifest = json.loads((tmp_path / "runs/batch/manifest.json").read_text())
    assert manifest["unit_counts"] == {"tasks": 9, "computed": 0, "from_store": 0, "reused": 9, "failed": 0}
    assert [c["label"] for c in manifest["inputs"]["checkpoints"]] == ["a", "b", "c"]
    page = (Path(__file__).parents[1] / "docs" / "cluster.md").read_text(encoding="utf-8")
    marker = "<!-- doc-test: run by tests/test_batch.py::test_the_guides_batch_commands_run_as_written -->\n```bash\n"
    (command,) = [b.split("```", 1)[0].strip() for b in page.split(marker)[1:]]
    code, _, err = fluency_cli(monkeypatch, capsys, *shlex.split(command)[1:])
    assert code == 0, err
    assert "Dask dashboard: http://127.0.0.1:" in err
    dask = json.loads((tmp_path / "runs/dask/manifest.json").read_text())
    assert dask["executor"]["kind"] == "dask" and dask["unit_counts"]["computed"] == 9
    pd.testing.assert_frame_equal(table(tmp_path / "runs/dask"), table(tmp_path / "runs/batch"), check_exact=False,
                                  rtol=1e-6, atol=0)  # the issue's bound for other thread counts


# -- Dask ------------------------------------------------------------------------------------------------------

def test_a_two_worker_dask_cluster_gives_the_local_tables_even_when_a_worker_is_killed(
        tmp_path: Path, models: Path, folder: dict[str, Path]) -> None:
    """Three checkpoints, gini and sam, on a 2-process LocalCluster (1 thread each) against the local executor with
    torch's default threads; during the Dask run one worker process is SIGKILLed while it holds a task: that
    task is rescheduled and the run completes. Activation metrics must be identical, SAM within 1e-3 relative."""
    import threading

    import psutil

    paths = sorted(models.glob("*/final.pt"))
    common = dict(metrics=["gini", "sam"], checkpoints=paths, shard_size=16, **folder, **FAST)
    local = fluency.run(out=tmp_path / "local", **common)
    out = tmp_path / "dask"
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if list(out.glob("units/*/*/metrics/*.partial")):  # a task under way
                workers = [p for p in psutil.Process().children(recursive=True)  # Dask's spawned workers, not
                           if "spawn_main" in " ".join(p.cmdline())]  # multiprocessing's resource tracker
                if workers:
                    workers[0].send_signal(signal.SIGKILL)
                    killed.append(workers[0].pid)
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_a_worker)
    watcher.start()
    dask = fluency.run(out=out, executor="dask", workers=2, **common)
    watcher.join()
    assert killed, "no worker was killed: the test did not test"
    assert dask.manifest["unit_counts"]["failed"] == 0 and dask.manifest["executor"]["threads"] == 1
    assert dask.manifest["unit_counts"]["tasks"] == 9
    a, b = table(local.path), table(out)
    sam = a.metric.str.startswith("sam")
    pd.testing.assert_frame_equal(a[~sam].reset_index(drop=True), b[~sam].reset_index(drop=True),
                                  check_exact=False, rtol=1e-6, atol=0)  # other thread counts: float32 rounding
    np.testing.assert_allclose(b[sam].value, a[sam].value, rtol=1e-3)


def test_a_failing_checkpoint_is_reported_and_the_others_complete(tmp_path: Path, models: Path,
                                                                  folder: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose task fails (NaN weights: NaN activations) costs only that checkpoint: one warning line
    naming it, its shard and the error, the others measured and analysed, the failure in the manifest and in
    --json; a rerun tries only the failed task again."""
    from fluency.core.model.checkpoint import load_checkpoint, save_checkpoint
    from fluency.core.plugin.manager import PluginManager

    loaded = load_checkpoint(models / "a" / "final.pt", PluginManager(autoload=False))
    with torch.no_grad():
        next(loaded.model.parameters()).fill_(float("nan"))
    info = {k: v for k, v in loaded.info.items() if k not in ("format", "format_version", "architecture")}
    save_checkpoint(tmp_path / "nan" / "final.pt", loaded.model, "vae-small", **info)
    args = ["run", "--metric", "gini", "--checkpoint", str(models / "b" / "final.pt"), "--checkpoint",
            str(tmp_path / "nan" / "final.pt"), "--images", str(folder["images"]), "--ratings",
            str(folder["ratings"]), "--out", str(tmp_path / "run"), "--no-report", "--no-figures", "--json"]
    code, out, err = fluency_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    said = " ".join(err.split())
    assert "warning: checkpoint nan, all images: checkpoint nan: NaN/Inf activations" in said
    assert "checkpoint nan left out of the results" in said
    summary = json.loads(out)
    assert summary["units"]["failed"] == 1 and summary["failed_tasks"][0]["label"] == "nan"
    assert set(pd.read_parquet(tmp_path / "run" / "metrics.parquet").checkpoint) == {"b"}
    assert set(pd.read_parquet(tmp_path / "run" / "analyses" / "pearson.parquet").checkpoint) == {"b"}
    code, out, err = fluency_cli(monkeypatch, capsys, *args)
    assert json.loads(out)["units"] == {"tasks": 2, "computed": 0, "from_store": 0, "reused": 1, "failed": 1}
    code, _, err = fluency_cli(monkeypatch, capsys, *args, "--fail-fast")
    assert code == 2 and "NaN/Inf activations" in err
