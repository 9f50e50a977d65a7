"""The activation store as the interchange: `fluency measure`, `fluency store import|info`, `fluency.open_store`.

The oracle of "measure equals the run" is the run's own live computation (a different path: model
forward pass and capture hooks instead of the Parquet reader); the oracle of the import test is a
Gini written out here from Hurley & Rickard's formula.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import fluency
from fluency.core.errors import FluencyError, StoreError
from fluency.core.inputs import demo
from fluency.core.model.checkpoint import save_checkpoint
from fluency.core.run.store import MARKER

ACTIVATION_METRICS = ["gini", "hoyer", "lepsilon", "typicality", "attention-l1"]
KEYS = ["checkpoint", "metric", "layer", "image_id"]
FIXTURE = Path(__file__).parent / "fixtures" / "run-v1"
#: measured 2026-12-03 on this model and stimuli (float16 store vs the live float32 run); bounds are ~3x that
FLOAT16_BOUNDS = {"gini": 3e-5, "hoyer": 1e-4}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "fluency.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def hurley_rickard_gini(x: np.ndarray) -> float:
    """G = 1 − 2 Σ_k (c_(k)/‖c‖₁)(N − k + ½)/N for c = |x| sorted ascending; G(0) = 0 (written out, no fluency)."""
    c = np.sort(np.abs(np.asarray(x, dtype=np.float64).ravel()))
    n, total = len(c), c.sum()
    if total == 0:
        return 0.0
    k = np.arange(1, n + 1)
    return float(1 - 2 * np.sum((c / total) * (n - k + 0.5) / n))


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve generated, rated images at 32×32 and a vae-small checkpoint with CBAM attention after enc3."""
    root = tmp_path_factory.mktemp("stimuli")
    images, table = demo.generate(n=12, size=32, seed=5)
    (root / "images").mkdir()
    for image, image_id in zip(images, table["image_id"]):
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
    table.to_csv(root / "ratings.csv", index=False)
    torch.manual_seed(0)
    from fluency.plugins.default_vae_small import VAESmall

    model = VAESmall(image_size=32, latent_dim=8, channels=[4, 8, 8, 16, 16], decoder_channels=[16, 8, 8, 4, 4],
                     attention=["enc3"])
    save_checkpoint(root / "att.pt", model, "vae-small")
    return root


def live_run(stimuli: Path, out: Path, dtype: str, **kwargs) -> fluency.core.run.folder.RunResult:
    kwargs.setdefault("covariates", False)  # activation metrics only: the store's subject, not image statistics
    return fluency.run(metrics=ACTIVATION_METRICS, images=stimuli / "images", ratings=stimuli / "ratings.csv",
                       checkpoints=[stimuli / "att.pt"], out=out, store_dtype=dtype, batch_size=5, figures=False,
                       progress=False, options=["typicality.dims=3"], **kwargs)


@pytest.fixture(scope="module")
def float32_run(stimuli: Path, tmp_path_factory: pytest.TempPathFactory) -> fluency.core.run.folder.RunResult:
    return live_run(stimuli, tmp_path_factory.mktemp("run32") / "run", "float32")


def by_key(table: pd.DataFrame) -> pd.DataFrame:
    table = table.assign(layer=table["layer"].fillna("-"))
    return table.sort_values(KEYS).reset_index(drop=True)


def test_store_then_measure_is_bit_identical_to_the_live_run_in_float32(float32_run, tmp_path: Path) -> None:
    store = float32_run.path / "activations" / "att"
    measured = fluency.measure(store, ACTIVATION_METRICS, out=tmp_path / "m", batch_size=5, progress=False,
                               options=["typicality.dims=3"])
    live, again = by_key(float32_run.metrics), by_key(measured.metrics)
    assert set(live["metric"]) == {"gini", "hoyer", "lepsilon", "lepsilon-fraction", "typicality", "attention-l1"}
    assert len(live) == len(again) and (live[KEYS] == again[KEYS]).all().all()
    for metric in live["metric"].unique():  # every activation metric, exactly
        sel = live["metric"] == metric
        np.testing.assert_array_equal(again.loc[sel, "value"].to_numpy(), live.loc[sel, "value"].to_numpy(),
                                      err_msg=metric)
    # another batch size reads other row groups: still the same values
    other = fluency.measure(store, ["gini", "hoyer"], out=tmp_path / "m2", batch_size=7, progress=False)
    np.testing.assert_array_equal(by_key(other.metrics)["value"].to_numpy(),
                                  live[live["metric"].isin(["gini", "hoyer"])].pipe(by_key)["value"].to_numpy())


def test_float16_store_differs_from_the_live_run_within_the_documented_bound(stimuli: Path, tmp_path: Path) -> None:
    run16 = live_run(stimuli, tmp_path / "run16", "float16")
    measured = fluency.measure(run16.path / "activations" / "att", ["gini", "hoyer"], out=tmp_path / "m",
                               progress=False)
    live, again = by_key(run16.metrics), by_key(measured.metrics)
    for metric, bound in FLOAT16_BOUNDS.items():
        a = live[live["metric"] == metric]["value"].to_numpy()
        b = again[again["metric"] == metric]["value"].to_numpy()
        worst = float(np.abs(a - b).max())
        assert 0 < worst < bound, (metric, worst)


def test_the_store_records_what_metrics_need_without_the_model(float32_run) -> None:
    store = fluency.open_store(float32_run.path / "activations" / "att")
    model = store.description
    assert model.architecture == "vae-small" and model.default_metric_layers == ("enc1", "enc2", "enc3", "enc4",
                                                                                  "enc5")
    assert model.attention_layers() == ["att3"] and model.checkpoint == "att" and len(model.checkpoint_sha256) == 64
    assert store.format_version == 2 and store.provenance["source"] == "run"
    # default stored layers: those the metrics read plus the model's default metric layers
    assert set(store.layers) == {"enc1", "enc2", "enc3", "enc4", "enc5", "att3"}
    assert float32_run.manifest["stores"]["att"]["layers"] == store.layers
    ids, first = next(store.iter_batches("enc5", batch_size=4))
    assert len(ids) == 4 and first.shape == (4, *store.shape("enc5")) and first.dtype == np.float32


def test_store_layers_option(stimuli: Path, tmp_path: Path) -> None:
    result = fluency.run(metrics=["gini"], images=stimuli / "images", checkpoints=[stimuli / "att.pt"], out=tmp_path / "a",
                         store_layers=["enc5", "mu"], figures=False, progress=False, layers=["enc5"])
    assert fluency.open_store(result.path / "activations" / "att").layers == ["enc5", "mu"]
    result = fluency.run(metrics=["gini"], images=stimuli / "images", checkpoints=[stimuli / "att.pt"], out=tmp_path / "b",
                         store_layers=["all"], figures=False, progress=False)
    assert "dec1" in fluency.open_store(result.path / "activations" / "att").layers
    with pytest.raises(FluencyError, match="unknown layer"):
        fluency.run(metrics=["gini"], images=stimuli / "images", checkpoints=[stimuli / "att.pt"],
                    out=tmp_path / "c", store_layers=["nope"], figures=False, progress=False)


def test_forward_passes_and_store_reads_trim_the_heap_every_few_batches(stimuli: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A long pass frees and reallocates batch-sized arrays; glibc's heap is trimmed every TRIM_EVERY batches
    of a live run and of a store measured later (issue 16: the measuring creep of a 30,000-image run)."""
    import sys

    from fluency.core import memory

    trims: list[str] = []  # who trimmed: the batch loops' trimmer ("tick"), or a step's end ("release_memory")
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(sys._getframe(1).f_code.co_name) or True)
    monkeypatch.setattr(memory, "TRIM_EVERY", 2)
    result = fluency.run(metrics=["gini"], images=stimuli / "images", checkpoints=[stimuli / "att.pt"],
                         out=tmp_path / "run", batch_size=3, figures=False, progress=False, covariates=False)
    assert trims.count("tick") == 12 // 3 // 2
    trims.clear()
    fluency.measure(result.path / "activations" / "att", ["gini"], out=tmp_path / "m", batch_size=2, progress=False)
    assert trims.count("tick") == 12 // 2 // 2


def test_each_step_of_a_run_hands_back_what_it_freed(stimuli: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrow's pool and glibc's heap keep what a step freed; a run releases both before measuring, after every
    metric-table merge and read, after each analysis and after each heavy view of the report, so that the
    steps' high-water marks do not stack (issue 16: 88 MiB kept after the analyses of 100,000 images)."""
    import sys

    from fluency.core import memory

    calls: list[str] = []
    monkeypatch.setattr(memory, "release_arrow_memory", lambda: None)
    monkeypatch.setattr(memory, "trim_heap",
                        lambda: calls.append(sys._getframe(2).f_code.co_name) or True)  # release_memory's caller
    fluency.run(metrics=["gini"], images=stimuli / "images", ratings=stimuli / "ratings.csv",
                checkpoints=[stimuli / "att.pt"], out=tmp_path / "run", batch_size=4, figures=False, progress=False,
                covariates=False, analyses=["pearson", "spearman"])
    assert calls.count("measure_checkpoint") == 1
    assert calls.count("analyse") == 2  # one per analysis
    assert calls.count("read_metric_columns") >= 2  # the run's analyses and its report each read the table
    assert calls.count("merge_tables") >= 1 and calls.count("_build") >= 3  # report: scatters, correlations, ...


def test_adding_a_metric_to_a_run_keeps_existing_rows_and_updates_manifest(float32_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(float32_run.path, run_dir)
    before = pq.read_table(run_dir / "metrics.parquet")
    parts_before = sorted(p.name for p in (run_dir / "metrics").iterdir())
    proc = cli("measure", str(run_dir), "--metric", "hoyer", "--metric", "lepsilon", "-o", "lepsilon.epsilon=0.002",
               "--replace", "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert "hoyer is already in this run with the same options" in proc.stderr
    after = pq.read_table(run_dir / "metrics.parquet")
    replaced = pa.array(["lepsilon", "lepsilon-fraction"])
    kept = after.filter(pc.invert(pc.is_in(after["metric"], value_set=replaced)))
    old = before.filter(pc.invert(pc.is_in(before["metric"], value_set=replaced)))
    assert kept.equals(old)  # the rows of every other metric: same values, same order
    new = after.filter(pc.equal(after["metric"], "lepsilon")).to_pandas()
    assert set(new["options_hash"]) != set(before.filter(pc.equal(before["metric"], "lepsilon"))["options_hash"].to_pylist())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["options"]["metric.lepsilon"]["epsilon"] == 0.002
    assert manifest["measured"][-1]["replaced"] == ["lepsilon"] and manifest["status"] == "complete"
    parts_after = sorted(p.name for p in (run_dir / "metrics").iterdir())
    assert len(parts_after) == len(parts_before) and parts_after != parts_before
    assert pd.read_parquet(run_dir / "analyses" / "pearson.parquet")["metric"].isin(["lepsilon"]).any()


def test_a_metric_with_other_options_needs_replace(float32_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(float32_run.path, run_dir)
    with pytest.raises(FluencyError, match="pass --replace"):
        fluency.measure(run_dir, ["gini"], options=["gini.negative=shift"], progress=False)


def test_a_store_without_its_marker_is_refused(float32_run, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(float32_run.path / "activations" / "att", store)
    (store / MARKER).unlink()
    proc = cli("measure", str(store), "--metric", "gini")
    assert proc.returncode == 2 and "incomplete (no _COMPLETE.json)" in proc.stderr and "Traceback" not in proc.stderr


def test_model_metrics_are_refused_and_image_metrics_need_images(float32_run, stimuli: Path, tmp_path: Path) -> None:
    store = float32_run.path / "activations" / "att"
    with pytest.raises(FluencyError, match="'sam' needs the model and its checkpoint"):
        fluency.measure(store, ["gini", "sam"], out=tmp_path / "a", progress=False)
    with pytest.raises(FluencyError, match="nothing to measure"):
        fluency.measure(store, ["image-stats"], out=tmp_path / "b", progress=False)
    with_images = fluency.measure(store, ["image-stats"], images=stimuli / "images", out=tmp_path / "c",
                                  progress=False)
    live = fluency.run(metrics=["image-stats"], images=stimuli / "images", checkpoints=[stimuli / "att.pt"],
                       out=tmp_path / "d", figures=False, progress=False, store=False)
    np.testing.assert_array_equal(by_key(with_images.metrics)["value"].to_numpy(),
                                  by_key(live.metrics)["value"].to_numpy())


def test_ratings_for_a_bare_store_are_matched_by_id(float32_run, stimuli: Path, tmp_path: Path) -> None:
    result = fluency.measure(float32_run.path / "activations" / "att", ["gini"], ratings=stimuli / "ratings.csv",
                             out=tmp_path / "m", analyses=["spearman"], progress=False)
    rows = result.analyses["spearman"]
    assert (rows["n"] == 12).all() and rows["p_fdr"].notna().all()


def write_thingsvision_folder(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    layers = {"features.10": np.maximum(rng.normal(size=(7, 6, 3, 3)), 0).astype(np.float32),
              "classifier.4": rng.normal(size=(7, 20)).astype(np.float32)}
    for name, array in layers.items():
        (root / name).mkdir(parents=True)
        np.save(root / name / "features.npy", array)
    return layers


def test_import_a_thingsvision_folder_and_measure_gini(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    layers = write_thingsvision_folder(tmp_path / "tv", rng)
    ids = [f"img{i:02d}.jpg" for i in range(7)]
    (tmp_path / "file_names.txt").write_text("\n".join(ids) + "\n")
    proc = cli("store", "import", str(tmp_path / "tv"), "--ids", str(tmp_path / "file_names.txt"),
               "--out", str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr
    info = cli("store", "info", str(tmp_path / "store"), "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["rows"] == 7 and described["layers"]["features.10"]["shape"] == [6, 3, 3]
    assert described["provenance"]["source"] == "imported" and len(described["provenance"]["source_sha256"]) == 64
    assert "features.10" in cli("store", "info", str(tmp_path / "store")).stdout
    result = fluency.measure(tmp_path / "store", ["gini"], out=tmp_path / "m", progress=False,
                             options=["gini.all_layers=false"])
    table = result.metrics.set_index(["layer", "image_id"])["value"]
    for name, array in layers.items():
        for i, image_id in enumerate(ids):
            assert table[(name, image_id)] == pytest.approx(hurley_rickard_gini(array[i]), abs=1e-12)


@pytest.mark.parametrize("kind", ["npz", "hdf5"])
def test_import_npz_and_hdf5(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(4)
    arrays = {"conv": rng.normal(size=(5, 2, 4, 4)).astype(np.float32), "fc": rng.normal(size=(5, 3))}
    if kind == "npz":
        source = tmp_path / "acts.npz"
        np.savez(source, **arrays)
    else:
        h5py = pytest.importorskip("h5py")
        source = tmp_path / "acts.h5"
        with h5py.File(source, "w") as fh:
            fh["conv"] = arrays["conv"]
            fh.create_group("head")["fc"] = arrays["fc"]
        arrays["head.fc"] = arrays.pop("fc")
    (tmp_path / "ids.txt").write_text("a\nb\nc\nd\ne\n")
    from fluency.core.run.importing import import_store

    store = fluency.open_store(import_store(source, tmp_path / "ids.txt", tmp_path / "store", console=None))
    assert sorted(store.layers) == sorted(arrays) and store.image_ids == list("abcde")
    for name, array in arrays.items():
        np.testing.assert_array_equal(store.read_layer(name)[1], array.astype(np.float32))


def test_bad_imports_are_one_line(tmp_path: Path) -> None:
    np.savez(tmp_path / "acts.npz", x=np.ones((3, 4)), bad=np.array([[1.0, np.nan], [0, 0], [0, 0]]))
    (tmp_path / "ids.txt").write_text("a\nb\n")
    proc = cli("store", "import", str(tmp_path / "acts.npz"), "--ids", str(tmp_path / "ids.txt"),
               "--out", str(tmp_path / "s1"))
    assert proc.returncode == 2 and "expected 2 rows" in proc.stderr
    (tmp_path / "ids.txt").write_text("a\nb\na\n")
    proc = cli("store", "import", str(tmp_path / "acts.npz"), "--ids", str(tmp_path / "ids.txt"),
               "--out", str(tmp_path / "s2"))
    assert proc.returncode == 2 and "'a' appears twice" in proc.stderr
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    proc = cli("store", "import", str(tmp_path / "acts.npz"), "--ids", str(tmp_path / "ids.txt"),
               "--out", str(tmp_path / "s3"), "--layers", "bad")
    assert proc.returncode == 2 and "NaN/Inf" in proc.stderr and "'a'" in proc.stderr
    assert not (tmp_path / "s3" / MARKER).exists()


def test_a_store_written_by_fluency_0_1_0_is_read(tmp_path: Path) -> None:
    """Format version 1 (the fixture was written by the code before this change, as float32): measure reads it,
    gives the values that run computed live, and adds to that run."""
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURE, run_dir)
    store = fluency.open_store(run_dir / "activations" / "default")
    assert store.format_version == 1 and store.description.default_metric_layers == ("enc5", "mu")
    old = by_key(pd.read_parquet(FIXTURE / "metrics.parquet"))
    again = fluency.measure(store.path, ["gini", "hoyer"], out=tmp_path / "m", progress=False,
                            options=["gini.layers=[enc5,mu]", "hoyer.layers=[enc5,mu]"])
    np.testing.assert_array_equal(by_key(again.metrics)["value"].to_numpy(), old["value"].to_numpy())
    added = fluency.measure(run_dir, ["lepsilon"], progress=False)
    assert set(added.metrics["metric"]) == {"gini", "hoyer", "lepsilon", "lepsilon-fraction"}
    kept = by_key(added.metrics[added.metrics["metric"].isin(["gini", "hoyer"])])
    np.testing.assert_array_equal(kept["value"].to_numpy(), old["value"].to_numpy())
    assert json.loads((run_dir / "manifest.json").read_text())["format_version"] == 2


def test_newer_formats_are_refused_with_one_line(float32_run, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(float32_run.path / "activations" / "att", store)
    marker = json.loads((store / MARKER).read_text())
    (store / MARKER).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(StoreError, match="format version 99, newer than this fluency reads"):
        fluency.open_store(store)
    run_dir = tmp_path / "run"
    shutil.copytree(float32_run.path, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(FluencyError, match="format version 99"):
        fluency.measure(run_dir, ["gini"], progress=False)
    table = pq.read_table(float32_run.path / "metrics.parquet")
    meta = {**table.schema.metadata, b"format_version": b"99"}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "t.parquet")
    from fluency.core.run.tables import read_metric_table

    with pytest.raises(StoreError, match="format version 99"):
        read_metric_table(tmp_path / "t.parquet")


def test_float16_store_keeps_values_it_cannot_hold_as_float32(tmp_path: Path) -> None:
    from fluency.core.run.store import ActivationStoreWriter

    with ActivationStoreWriter(tmp_path / "s", provenance={}, model=fluency.ModelDescription("x", ("a",))) as writer:
        writer.write("a", ["i"], np.array([[1e6, 0.0]], np.float32))
    store = fluency.open_store(tmp_path / "s")
    assert store.dtype("a") == np.float32 and store.read_layer("a")[1][0, 0] == 1e6  # never inf
    assert "float32" in writer.notes[0]


def test_open_store_batches_for_notebooks(float32_run) -> None:
    store = fluency.open_store(float32_run.path / "activations" / "att")
    batches = list(store.metric_batches(["enc5", "att3"], batch_size=5))
    assert [len(b.image_ids) for b in batches] == [5, 5, 2]
    assert all(b.model is None and b.images is None and b.description == store.description for b in batches)
    assert batches[0].activations["att3"].shape == (5, *store.shape("att3"))


def guide_section_blocks(language: str) -> list[str]:
    text = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text[text.index("## `fluency measure`"):text.index("## The embedded default")]
    return [block.split("```", 1)[0] for block in section.split(f"```{language}\n")[1:]]


def run_in(folder: Path, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a documented ``fluency ...`` command line in ``folder``, in this process (no interpreter start-up)."""
    from click.testing import CliRunner

    from fluency.cli import cli as fluency_cli

    args = command.split("#", 1)[0].split()
    assert args[0] == "fluency", command
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(fluency_cli, args[1:], catch_exceptions=False)
    assert result.exit_code == 0, (command, result.output)


def test_the_user_guides_measure_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command of the guide's `fluency measure` section and of the README's "Measure stored activations",
    in a folder holding what they name."""
    run_in(tmp_path, f"fluency demo export {tmp_path}", monkeypatch)  # ratings.csv of the embedded default
    ids = pd.read_csv(tmp_path / "ratings.csv")["image_id"].astype(str).tolist()
    (tmp_path / "file_names.txt").write_text("\n".join(ids) + "\n")
    rng = np.random.default_rng(0)
    for layer, shape in (("features.10", (8, 4, 4)), ("classifier.4", (16,))):
        (tmp_path / "features" / layer).mkdir(parents=True)
        np.save(tmp_path / "features" / layer / "features.npy",
                np.maximum(rng.normal(size=(len(ids), *shape)), 0).astype(np.float32))
    commands = [line for block in guide_section_blocks("bash") for line in block.splitlines() if line.strip()]
    assert len(commands) == 6
    for command in commands:
        run_in(tmp_path, command, monkeypatch)
    assert {"gini", "sam", "hoyer", "lepsilon"} <= set(pd.read_parquet(tmp_path / "runs/demo/metrics.parquet")["metric"])
    assert (tmp_path / "runs/vgg16-gini/analyses/pearson.parquet").exists()
    (python,) = guide_section_blocks("python")
    exec(compile(python, "user-guide.md", "exec"), {})
    # the README's block, on a copy of that folder
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("## Measure stored activations"):].split("```bash\n", 1)[1].split("```", 1)[0]
    other = tmp_path / "readme"
    other.mkdir()
    for name in ("runs/demo", "features"):
        shutil.copytree(tmp_path / name, other / name)
    for name in ("file_names.txt", "ratings.csv"):
        shutil.copy(tmp_path / name, other / name)
    for line in block.splitlines():
        run_in(other, line, monkeypatch)
    assert (other / "runs/vgg16-gini/metrics.parquet").exists()


# -- what a careful user or an attacker would try (review findings) ----------------------------------


def test_a_failed_measure_leaves_the_run_as_it_was(float32_run, tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(float32_run.path, run_dir)

    def results() -> dict[Path, bytes]:  # the ledger (.fluency-ledger) may list files a failed measure removed
        return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
                if p.is_file() and not p.name.startswith(".fluency-")}

    before = results()
    with pytest.raises(FluencyError, match="no column"):  # checked before any work
        fluency.measure(run_dir, ["lepsilon"], options=["lepsilon.epsilon=0.5"], replace=True, by=["nope"],
                        progress=False)
    from fluency.core.run import measure as measure_module

    def failing(*args, **kwargs):
        raise RuntimeError("analysis exploded")

    monkeypatch.setattr(measure_module, "analyse", failing)
    with pytest.raises(RuntimeError, match="exploded"):  # after measuring and merging
        fluency.measure(run_dir, ["lepsilon"], options=["lepsilon.epsilon=0.5"], replace=True, progress=False)
    after = results()
    assert after == before  # no new part, no staged table, same merged table and manifest
    monkeypatch.undo()
    result = fluency.measure(run_dir, ["lepsilon"], options=["lepsilon.epsilon=0.5"], replace=True, progress=False)
    counts = result.metrics.groupby(["metric", "layer"], dropna=False).size()
    assert (counts == 12).all()  # one row per image: nothing duplicated by the failed attempts


def test_the_store_reader_streams_instead_of_holding_layers(tmp_path: Path) -> None:
    from fluency.core.run.store import ActivationStoreWriter

    rows, shape = 64, (64, 32, 32)  # 256 KiB per image, 16 MiB per layer
    with ActivationStoreWriter(tmp_path / "s", dtype="float32", rows_per_group=8, provenance={}) as writer:
        for start in range(0, rows, 8):
            writer.write("big", [f"i{k}" for k in range(start, start + 8)], np.ones((8, *shape), np.float32))
    peak, base = 0, pa.total_allocated_bytes()
    for batch in fluency.open_store(tmp_path / "s").metric_batches(["big"], batch_size=8):
        peak = max(peak, pa.total_allocated_bytes() - base)
        assert batch.activations["big"].shape == (8, *shape)
    assert peak < 4 * 8 * 256 * 1024, peak  # a few row groups of 2 MiB, not the 16 MiB layer


def test_nothing_outside_the_run_is_deleted_or_written_by_what_a_folder_says(float32_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(float32_run.path, run_dir)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for part in manifest["metric_parts"]:
        part["file"] = "../victim.txt"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    fluency.measure(run_dir, ["gini"], options=["gini.negative=shift"], replace=True, progress=False)
    assert victim.read_text() == "keep me"
    # a store whose recorded checkpoint label is a path: state goes under the output folder, named safely
    store = tmp_path / "store"
    shutil.copytree(float32_run.path / "activations" / "att", store)
    marker = json.loads((store / MARKER).read_text())
    marker["model"]["checkpoint"] = str(tmp_path / "escaped")
    (store / MARKER).write_text(json.dumps(marker))
    fluency.measure(store, ["typicality"], out=tmp_path / "m", progress=False, options=["typicality.dims=3"])
    assert not (tmp_path / "escaped").exists() and (tmp_path / "m" / "state" / "store" / "typicality.pt").exists()


def test_in_place_measure_keeps_the_runs_ratings_subgroups_and_analysis_options(stimuli: Path, tmp_path: Path) -> None:
    run = fluency.run(metrics=["gini"], images=stimuli / "images", ratings=stimuli / "ratings.csv",
                      checkpoints=[stimuli / "att.pt"], out=tmp_path / "run", figures=False, progress=False,
                      by=["clutter"], min_group_size=2, analyses=["spearman"], options=["spearman.n_boot=50"])
    groups = set(run.analyses["spearman"]["group"])
    with pytest.raises(FluencyError, match="keeps the ratings it was analysed with"):
        fluency.measure(run.path, ["hoyer"], ratings=stimuli / "ratings.csv", progress=False)
    result = fluency.measure(run.path, ["hoyer"], progress=False)
    assert set(result.analyses["spearman"]["group"]) == groups and len(groups) > 1
    assert result.manifest["options"]["analysis.spearman"]["n_boot"] == 50
    assert set(result.analyses) == {"spearman"} and result.manifest["subgroups"]["by"] == ["clutter"]
    result = fluency.measure(run.path, ["lepsilon"], analyses=["pearson"], progress=False)
    assert sorted(p.name for p in (run.path / "analyses").iterdir()) == ["pearson.parquet"]  # no stale table


def test_more_bad_stores_and_imports_are_one_line(float32_run, tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("a\nb\n")
    np.savez(tmp_path / "objects.npz", x=np.array([[1, "a"], [2, "b"]], dtype=object))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "objects.npz").read_bytes()[:40])
    np.savez(tmp_path / "empty.npz")
    np.savez(tmp_path / "huge.npz", x=np.array([[1e300, 0.0], [0.0, 0.0]]))
    (tmp_path / "a-file").write_text("")
    cases = [(["objects.npz"], "not a readable .npz"), (["truncated.npz"], "not a readable .npz"),
             (["empty.npz"], "holds no arrays"), (["huge.npz"], "beyond float32's range"),
             (["huge.npz", "--out", "a-file"], "not an empty folder")]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", "store-" + args[0]]
        proc = cli("store", "import", args[0], "--ids", "ids.txt", *args[1:], *out, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    store = tmp_path / "bad-store"
    shutil.copytree(float32_run.path / "activations" / "att", store)
    marker = json.loads((store / MARKER).read_text())
    del marker["layers"]["enc5"]["rows"]
    (store / MARKER).write_text(json.dumps(marker))
    for command in (["store", "info", str(store)], ["measure", str(store), "--metric", "gini"]):
        proc = cli(*command)
        assert proc.returncode == 2 and "describes layer 'enc5' wrongly" in proc.stderr, proc.stderr
    proc = cli("store", "info", str(float32_run.path))
    assert proc.returncode == 2 and "is not an activation store but holds stores" in proc.stderr


def test_attention_metric_on_a_store_without_attention_says_so(tmp_path: Path) -> None:
    result = fluency.run(metrics=["gini"], out=tmp_path / "r", figures=False, progress=False, layers=["enc5"])
    with pytest.raises(FluencyError, match=r"model \(architecture vae-small\) has no attention layers; train one with "):
        fluency.measure(result.path / "activations" / "default", ["attention-l1"], out=tmp_path / "m",
                        progress=False)
    assert not (tmp_path / "m").exists()  # nothing left behind by the failed measure
