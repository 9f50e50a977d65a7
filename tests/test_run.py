"""`fluency run` end to end: the embedded default, real faces, the Python API and bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from statsmodels.stats.multitest import multipletests

import fluency
from fluency.core.errors import FluencyError, InputError, OptionError, PluginError, StoreError
from fluency.core.run.store import ActivationStore


#: the image-stats covariates every run with images computes (unless --no-covariates)
COVARIATES = {"luminance", "rms-contrast", "spectral-slope", "edge-density", "jpeg-bpp"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "fluency.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The README's main job, through the real command line."""
    out = tmp_path_factory.mktemp("runs") / "default"
    proc = cli("run", "--metric", "gini", "--metric", "sam", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_default_run_writes_every_output(default_run) -> None:
    out, summary = default_run
    assert summary["status"] == "complete" and summary["n_images"] == 240
    for name in ("metrics.parquet", "manifest.json", "ratings.parquet", "analyses/pearson.parquet",
                 "analyses/spearman.parquet", "activations/default/_COMPLETE.json"):
        assert (out / name).exists(), name
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert {"image_id", "checkpoint", "metric", "layer", "value"} <= set(metrics.columns)
    assert set(metrics["metric"]) == {"gini", "sam", *COVARIATES}  # the covariates: computed, not tested
    assert metrics.loc[metrics.metric == "sam", "layer"].isna().all()
    assert set(metrics.loc[metrics.metric == "gini", "layer"]) == {"enc1", "enc2", "enc3", "enc4", "enc5", "all"}
    assert metrics.groupby(["metric", "layer"], dropna=False).size().eq(240).all()
    gini_values, sam_values = metrics.loc[metrics.metric == "gini", "value"], metrics.loc[metrics.metric == "sam", "value"]
    assert gini_values.between(0, 1).all() and gini_values.gt(0).all()  # trained ReLU layers: sparse, never uniform
    assert np.isfinite(sam_values).all() and sam_values.gt(0).all()  # sharpness at ρ = 0.05: ≈ ρ‖g‖ > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"]["checkpoints"][0]["sha256"]
    assert manifest["options"]["metric.sam"]["rho"] == 0.05 and "total" in manifest["timings"]
    # the settings once, as the RunConfig; the metric parts, each row carrying its part's identity
    assert manifest["config"]["metrics"] == ["gini", "sam"] and manifest["config"]["store_dtype"] == "float16"
    assert manifest["format"] == "fluency-run" and manifest["format_version"] == 2
    parts = {p["plugin"]: p for p in manifest["metric_parts"]}
    assert set(parts) == {"gini", "sam", "image-stats"} and all((out / p["file"]).exists() for p in parts.values())
    assert parts["sam"]["options"] == manifest["options"]["metric.sam"]
    for plugin, part in parts.items():
        rows = metrics[metrics["plugin"] == plugin]
        assert set(rows["options_hash"]) == {part["options_hash"]} and set(rows["plugin_version"]) == {
            part["plugin_version"]}
        assert len(pd.read_parquet(out / part["file"])) == len(rows)


def test_run_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(FluencyError, match="unknown run setting"):
        fluency.run(metrics=["gini"], out=tmp_path / "x", batchsize=4, progress=False)
    assert not (tmp_path / "x").exists()


def test_default_run_recovers_the_generators_relation(default_run) -> None:
    """Clutter lowers the rating and makes the model's loss sharper: SAM sharpness falls with the rating."""
    out, _ = default_run
    pearson = pd.read_parquet(out / "analyses" / "pearson.parquet")
    sam = pearson[pearson.metric == "sam"].iloc[0]
    assert sam["estimate"] < -0.2 and sam["p_fdr"] < 0.05
    both = pd.concat([pearson, pd.read_parquet(out / "analyses" / "spearman.parquet")])
    assert len(both) == 14 and np.isfinite(both["p"]).all() and (both["same_as"] == "").all()  # no repeated test
    # p_fdr is one Benjamini–Hochberg over every test of the run, raw and covariate-adjusted alike (statsmodels as
    # the oracle)
    family = multipletests(np.concatenate([both["p"], both["p_adj"]]), method="fdr_bh")[1]
    assert np.allclose(both["p_fdr"], family[:len(both)], rtol=1e-12, atol=0)
    assert np.allclose(both["p_adj_fdr"], family[len(both):], rtol=1e-12, atol=0)
    # ... and that the relation is clutter's: controlling for the image-stats covariates, it vanishes
    assert abs(sam["estimate_adj"]) < 0.1 and sam["p_adj_fdr"] > 0.05


def test_activation_store_of_a_run_has_provenance_and_matches_the_metric(default_run) -> None:
    out, _ = default_run
    store = ActivationStore(out / "activations" / "default")
    prov = store.provenance
    assert prov["checkpoint_sha256"] and prov["stimulus_fingerprint"] and prov["seed"] == 0
    assert prov["fluency_version"] == fluency.__version__ and "metric.gini" not in prov  # versions per plugin
    assert set(store.layers) == {"enc1", "enc2", "enc3", "enc4", "enc5"}
    assert store.num_rows("enc1") == 240 and store.shape("enc1") == (16, 64, 64)
    ids, acts = store.read_layer("enc2")
    metrics = pd.read_parquet(out / "metrics.parquet")
    want = metrics[(metrics.metric == "gini") & (metrics.layer == "enc2")].set_index("image_id").loc[ids, "value"]
    # the store holds float16 (relative rounding u = 2⁻¹¹): each |x| moves by at most u·|x|, so Gini
    # (Σ|cᵢ − cⱼ| / 2N Σc) moves by at most 2u ≈ 1e-3 from the float32 metric
    got = [hurley_rickard_gini(row) for row in acts.reshape(len(ids), -1)]
    assert np.allclose(got, want.to_numpy(), rtol=0, atol=2 * 2.0**-11)


def hurley_rickard_gini(x: np.ndarray) -> float:
    """Hurley & Rickard's Gini in plain float64 numpy (REFERENCE.md): c = |x| ascending,
    G = 1 − 2 Σ_k (c_k / ‖c‖₁)(N − k + ½)/N, G(0) = 0."""
    c = np.sort(np.abs(np.asarray(x, dtype=np.float64)).ravel())
    n, total = len(c), c.sum()
    if total == 0:
        return 0.0
    k = np.arange(1, n + 1)
    return float(1 - 2 * np.sum(c / total * (n - k + 0.5) / n))


def test_a_float32_store_holds_exactly_what_the_metric_measured(tmp_path: Path) -> None:
    """With a float32 store the Gini of every stored layer, and of their concatenation (layer "all"), is the
    metric's value to float32 precision: the store holds the activations the run measured."""
    assert hurley_rickard_gini(np.array([-1.0, 0.0, 1.0])) == pytest.approx(1 / 3, abs=1e-15)  # the oracle's own
    assert hurley_rickard_gini(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.25, abs=1e-15)  # known answers
    layers = ["enc2", "enc4"]
    result = fluency.run(metrics=["gini"], layers=layers, options=["gini.all_layers=true"], store_dtype="float32",
                         analyses=[], out=tmp_path / "f32", progress=False)
    store = ActivationStore(result.path / "activations" / "default")
    table = result.metrics[result.metrics.metric == "gini"].set_index(["layer", "image_id"])["value"]
    rows = {}
    for layer in layers:
        ids, acts = store.read_layer(layer)
        assert acts.dtype == np.float32
        rows[layer] = acts.reshape(len(ids), -1)
        got = [hurley_rickard_gini(row) for row in rows[layer]]
        assert np.allclose(got, table[layer].loc[ids].to_numpy(), rtol=0, atol=1e-6), layer
    pooled = np.concatenate([rows[layer] for layer in layers], axis=1)
    got = [hurley_rickard_gini(row) for row in pooled]
    assert np.allclose(got, table["all"].loc[ids].to_numpy(), rtol=0, atol=1e-6)


def test_default_run_prints_a_readable_summary(tmp_path: Path) -> None:
    proc = cli("run", "--metric", "gini", "--out", str(tmp_path / "r"), "--no-store")
    assert proc.returncode == 0, proc.stderr
    assert "Strongest relations" in proc.stdout and "gini" in proc.stdout and "p_fdr" in proc.stdout
    assert not (tmp_path / "r" / "activations").exists()


def test_python_api_same_as_cli(tmp_path: Path) -> None:
    result = fluency.run(metrics=["lepsilon", "hoyer"], options=["lepsilon.mode=relative", "lepsilon.epsilon=0.1"],
                         layers=["enc1", "enc2"], out=tmp_path / "api", progress=False, store=False)
    assert result.path == tmp_path / "api" and (result.path / "report.html").exists()  # as the CLI writes it
    assert set(result.metrics["metric"]) == {"lepsilon", "lepsilon-fraction", "hoyer", *COVARIATES}
    assert set(result.metrics["layer"].dropna()) == {"enc1", "enc2"}
    assert set(result.analyses) == {"pearson", "spearman"} and "p_fdr" in result.analyses["pearson"]
    for table in result.analyses.values():  # count and fraction are one test: the fraction's rows are marked
        assert table.loc[table.metric == "lepsilon-fraction", "same_as"].tolist() == ["lepsilon@enc1", "lepsilon@enc2"]
        assert (table.loc[table.metric == "lepsilon", "same_as"] == "").all()
    assert set(result.strongest(None)["metric"]) == {"lepsilon", "hoyer"}  # the summary shows each test once
    assert result.manifest["options"]["metric.lepsilon"] == {"epsilon": 0.1, "mode": "relative",
                                                            "layers": ["enc1", "enc2"], "all_layers": False,
                                                            "layer_weighting": "units", "layer_weights": None}
    everything = result.strongest(None)
    assert len(everything) == 8 and result.strongest(5).equals(everything.head(5))
    first = everything["metric"][0]
    one_each = result.strongest(1, every_metric=True)
    assert len(one_each) == 2 and set(one_each["metric"]) == {"lepsilon", "hoyer"} and one_each["metric"][0] == first


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    a = fluency.run(metrics=["sam"], out=tmp_path / "a", progress=False, store=False).metrics
    b = fluency.run(metrics=["sam"], out=tmp_path / "b", progress=False, store=False).metrics
    assert np.array_equal(a["value"].to_numpy(), b["value"].to_numpy())


def test_activation_metrics_stop_after_the_encoder(tmp_path: Path, monkeypatch) -> None:
    """gini and lepsilon read encoder layers only: the decoder never runs, and the metric table and the store
    equal those of a pass through the whole model (issue 16, point 2)."""
    from fluency.core.run import checkpoints as loader
    from fluency.core.run import forward

    decoded: list[int] = []
    original = loader.load_checkpoint

    def counting(*args, **kwargs):
        loaded = original(*args, **kwargs)
        decode = loaded.model.decode
        loaded.model.decode = lambda *a, **k: (decoded.append(len(a[0])), decode(*a, **k))[1]
        return loaded

    monkeypatch.setattr(loader, "load_checkpoint", counting)
    quiet = {"progress": False, "figures": False, "report": False, "covariates": False}
    short = fluency.run(metrics=["gini", "lepsilon"], out=tmp_path / "short", **quiet)
    assert decoded == []
    monkeypatch.setattr(forward, "encodes_alone", lambda model: False)
    whole = fluency.run(metrics=["gini", "lepsilon"], out=tmp_path / "whole", **quiet)
    assert sum(decoded) == 240  # the whole model ran on every image
    pd.testing.assert_frame_equal(short.metrics.drop(columns="run_id"), whole.metrics.drop(columns="run_id"))
    a, b = (ActivationStore(tmp_path / run / "activations" / "default") for run in ("short", "whole"))
    assert a.layers == b.layers
    for layer in a.layers:
        (ids_a, values_a), (ids_b, values_b) = a.read_layer(layer), b.read_layer(layer)
        assert ids_a == ids_b and np.array_equal(values_a, values_b)


def test_forward_hooks_are_removed_even_when_a_metric_fails(tmp_path: Path, monkeypatch) -> None:
    from fluency.core.run import checkpoints as loader  # where the run loads each checkpoint
    from fluency.plugins.default_gini import Gini

    seen = []
    original = loader.load_checkpoint

    def spy(*args, **kwargs):
        loaded = original(*args, **kwargs)
        seen.append(loaded.model)
        return loaded

    compute = Gini.compute

    def explode(self, batch):  # the first batch is measured, the second fails
        if getattr(self, "_measured_once", False):
            raise RuntimeError("metric exploded")
        self._measured_once = True
        return compute(self, batch)

    monkeypatch.setattr(loader, "load_checkpoint", spy)
    monkeypatch.setattr(Gini, "compute", explode)
    with pytest.raises(FluencyError, match="metric 'gini' .* failed: RuntimeError: metric exploded"):
        fluency.run(metrics=["gini"], out=tmp_path / "boom", progress=False)
    (model,) = seen
    assert all(not m._forward_hooks for m in model.modules())
    manifest = json.loads((tmp_path / "boom" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "exploded" in manifest["error"]
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "boom" / "activations" / "default")
    assert not (tmp_path / "boom" / "metrics.parquet").exists()
    (partial,) = (tmp_path / "boom" / "units" / "default" / "all" / "metrics").glob("gini-*.parquet.partial")  # kept
    assert len(pq.read_table(partial)) == 32 * 6 and not list((tmp_path / "boom" / "metrics").glob("*.parquet"))


def test_out_folder_is_not_silently_reused(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    with pytest.raises(FluencyError, match="not empty"):
        fluency.run(metrics=["gini"], out=tmp_path / "busy", progress=False)
    with pytest.raises(FluencyError, match="not a fluency run"):
        fluency.run(metrics=["gini"], out=tmp_path / "busy", overwrite=True, progress=False)
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "precious"


# -- real data --------------------------------------------------------------


def test_london_faces_end_to_end(london_faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "faces"
    proc = cli("run", "--images", str(london_faces / "images"), "--ratings", str(london_faces / "ratings.csv"),
               "--rating-column", "attractiveness", "--metric", "gini,lepsilon", "--metric", "sam",
               "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["n_images"] == 102 and summary["matching"]["mode"] == "stem"
    pearson = pd.read_parquet(out / "analyses" / "pearson.parquet")
    assert (pearson["n"] == 102).all() and pearson.loc[pearson.same_as == "", "p_fdr"].notna().all()
    # lepsilon's fraction is its count / N: the same test, kept out of the FDR family and marked
    fraction = pearson[pearson.metric == "lepsilon-fraction"]
    assert len(fraction) and (fraction["same_as"] == "lepsilon@" + fraction["layer"]).all()
    assert fraction["p_fdr"].isna().all()
    ratings = pd.read_parquet(out / "ratings.parquet")
    assert len(ratings) == 102 and {"face_sex", "face_eth"} <= set(ratings.columns)


# -- bad inputs ---------------------------------------------------------------


@pytest.fixture
def small_set(tmp_path: Path) -> Path:
    """Six images in two folders and a ratings table keyed by stem."""
    rng = np.random.default_rng(0)
    root = tmp_path / "set"
    for i, sub in enumerate(["a", "a", "a", "b", "b", "b"]):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / sub / f"{i + 1}.png")
    pd.DataFrame({"id": [str(i) for i in range(1, 7)], "beauty": [3.0, 4, 2, 5, 1, 6]}).to_csv(root / "r.csv",
                                                                                            index=False)
    return root


def run_small(root: Path, tmp_path: Path, ratings: str = "r.csv", **kwargs):
    return fluency.run(metrics=["gini"], images=root / "images", ratings=root / ratings, id_column="id",
                       rating_column="beauty", out=tmp_path / "out", progress=False, store=False, **kwargs)


def test_numeric_ids_match_files_and_analyses_run(small_set: Path, tmp_path: Path) -> None:
    result = run_small(small_set, tmp_path)
    assert sorted(result.metrics["image_id"].unique()) == [str(i) for i in range(1, 7)]
    assert result.report is not None and result.report.ok and result.report.mode == "stem"
    assert (result.analyses["pearson"]["n"] == 6).all()


def test_mismatches_are_reported_not_silently_dropped(small_set: Path, tmp_path: Path) -> None:
    table = pd.read_csv(small_set / "r.csv", dtype=str)
    table.loc[len(table)] = ["99", "4"]            # rated, no image
    table = table[table["id"] != "6"]              # image 6 unrated
    table.to_csv(small_set / "r2.csv", index=False)
    result = run_small(small_set, tmp_path, "r2.csv")
    assert result.report.missing_images == ["99"] and result.report.unrated_images == ["b/6.png"]
    assert "6" in set(result.metrics["image_id"])          # measured ...
    assert (result.analyses["pearson"]["n"] == 5).all()    # ... but not analysed
    assert result.manifest["matching"]["missing_images"] == ["99"]
    with pytest.raises(InputError, match="99"):
        run_small(small_set, tmp_path / "strict", "r2.csv", strict=True)


def test_duplicate_ids_and_non_numeric_ratings_are_errors_naming_rows(small_set: Path, tmp_path: Path) -> None:
    table = pd.read_csv(small_set / "r.csv", dtype=str)
    pd.concat([table, table.iloc[[2]]]).to_csv(small_set / "dup.csv", index=False)
    with pytest.raises(InputError, match=r"(?s)duplicate.*3.*rows? 4.*8"):
        run_small(small_set, tmp_path, "dup.csv")
    table.loc[1, "beauty"] = "pretty"
    table.to_csv(small_set / "nan.csv", index=False)
    with pytest.raises(InputError, match=r"(?s)row 3.*pretty"):
        run_small(small_set, tmp_path, "nan.csv")


def test_missing_rating_column_lists_the_columns(small_set: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="beauty"):
        fluency.run(metrics=["gini"], images=small_set / "images", ratings=small_set / "r.csv", id_column="id",
                    rating_column="beuty", out=tmp_path / "o", progress=False)


def test_corrupt_images_are_skipped_and_reported_strict_stops(small_set: Path, tmp_path: Path) -> None:
    good = (small_set / "images" / "b" / "5.png").read_bytes()
    (small_set / "images" / "a" / "2.png").write_bytes(b"not a png at all")
    (small_set / "images" / "b" / "5.png").write_bytes(good[: len(good) // 2])  # truncated
    result = run_small(small_set, tmp_path)
    assert sorted(result.metrics["image_id"].unique()) == ["1", "3", "4", "6"]
    assert (result.analyses["pearson"]["n"] == 4).all()
    assert set(result.unreadable) == {"a/2.png", "b/5.png"} and "Truncated" in result.unreadable["b/5.png"]
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["unreadable_images"]) == {"a/2.png", "b/5.png"}
    assert set(manifest["matching"]["unreadable_images"]) == {"a/2.png", "b/5.png"}
    assert sorted(manifest["matching"]["unreadable_ids"]) == ["2", "5"] and manifest["matching"]["n_matched"] == 4
    assert not manifest["matching"]["missing_images"] and not manifest["matching"]["unrated_images"]
    assert any("a/2.png (UnidentifiedImageError" in line for line in result.report.summary_lines())
    with pytest.raises(InputError, match=r"--strict: 2 images cannot be read: .*2\.png \(Unidentified"):
        run_small(small_set, tmp_path / "strict", strict=True)
    unrated = fluency.run(metrics=["gini"], images=small_set / "images", out=tmp_path / "unrated", progress=False,
                          store=False)
    assert set(unrated.unreadable) == {"a/2.png", "b/5.png"} and unrated.metrics["image_id"].nunique() == 4


def test_terminal_summary_lists_unreadable_images(small_set: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fluency.cli import cli as fluency_cli

    (small_set / "images" / "a" / "2.png").write_bytes(b"\x89PNG garbage")
    for extra in ([], ["--ratings", str(small_set / "r.csv"), "--id-column", "id", "--rating-column", "beauty"]):
        out = tmp_path / f"o{len(extra)}"
        res = CliRunner().invoke(fluency_cli, ["run", "--metric", "gini", "--images", str(small_set / "images"),
                                               *extra, "--no-store", "--no-report", "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert "cannot be read" in res.stderr and "a/2.png" in res.stderr, res.stderr


def test_an_image_failing_while_measuring_is_left_out_of_every_checkpoint(small_set: Path, tmp_path: Path,
                                                                        monkeypatch, manager) -> None:
    """A file that passes the up-front check but fails later (changed on disk) loses no finished work."""
    from fluency.core.run import checkpoints as loader  # where the run loads each checkpoint
    from fluency.core.inputs import stimuli
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
    from fluency.core.inputs.images import FolderSource

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, manager)
    save_checkpoint(tmp_path / "other.pt", loaded.model, "vae-small",
                    **{k: v for k, v in loaded.info.items() if k not in ("format", "format_version", "architecture")},
                    note="a second, different file")
    monkeypatch.setattr(stimuli, "find_unreadable", lambda paths: {})
    current: list[str] = []  # the label of the checkpoint being measured
    broken_for = {"other"}  # the checkpoints for which image 3 fails to load
    load_ckpt, load_image = loader.load_checkpoint, FolderSource.load

    def tracking(path: Path, manager, label: str):
        current.append(label)
        return load_ckpt(path, manager, label)

    def flaky(self: FolderSource, index: int) -> torch.Tensor:
        if self.ids[index] == "3" and current[-1] in broken_for:
            raise InputError(f"cannot read image {self.paths[index]}: OSError: gone") from OSError("gone")
        return load_image(self, index)

    monkeypatch.setattr(loader, "load_checkpoint", tracking)
    monkeypatch.setattr(FolderSource, "load", flaky)
    result = run_small(small_set, tmp_path, checkpoints=[DEFAULT_CHECKPOINT, tmp_path / "other.pt"])
    assert result.manifest["status"] == "complete" and result.unreadable == {"a/3.png": "OSError: gone"}
    assert set(result.metrics["checkpoint"]) == {"default", "other"}
    assert sorted(result.metrics["image_id"].unique()) == ["1", "2", "4", "5", "6"]
    assert sorted(pd.read_parquet(result.path / "metrics.parquet")["image_id"].unique()) == ["1", "2", "4", "5", "6"]
    assert (result.analyses["pearson"]["n"] == 5).all()
    assert result.manifest["matching"]["unreadable_ids"] == ["3"] and "3" not in result.report.matched
    broken_for.add("default")
    with pytest.raises(InputError, match=r"3\.png"):
        run_small(small_set, tmp_path / "strict", strict=True)


def test_a_ratings_table_matching_no_image_is_an_error_with_examples(small_set: Path, tmp_path: Path) -> None:
    pd.DataFrame({"id": ["face_01", "face_02"], "beauty": [1.0, 2]}).to_csv(small_set / "none.csv", index=False)
    with pytest.raises(InputError, match=r"(?s)no rated id in column 'id'.*'face_01'.*a/1\.png.*--id-column"):
        run_small(small_set, tmp_path, "none.csv")
    pd.DataFrame({"id": ["A/1", "A/2"], "beauty": [1.0, 2]}).to_csv(small_set / "case.csv", index=False)
    with pytest.raises(InputError, match="if case were ignored"):
        run_small(small_set, tmp_path, "case.csv")


def test_a_checkpoint_given_twice_is_measured_once(tmp_path: Path, monkeypatch) -> None:
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT

    shutil.copy(DEFAULT_CHECKPOINT, tmp_path / "a.pt")
    shutil.copy(DEFAULT_CHECKPOINT, tmp_path / "copy.pt")   # another file, the same bytes
    os.link(tmp_path / "a.pt", tmp_path / "hard.pt")        # another name for the same file
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    result = fluency.run(metrics=["gini"], checkpoints=[tmp_path / "a.pt", Path("../a.pt"), tmp_path / "hard.pt",
                                                        tmp_path / "copy.pt"],
                         out=tmp_path / "o", progress=False, store=False, analyses=[])
    assert set(result.metrics["checkpoint"]) == {"a"} and len(result.manifest["inputs"]["checkpoints"]) == 1
    notes = result.manifest["inputs"]["duplicate_checkpoints"]
    assert [(n["path"], n["same_as"]) for n in notes] == [("../a.pt", str(tmp_path / "a.pt")),
                                                          (str(tmp_path / "hard.pt"), str(tmp_path / "a.pt")),
                                                          (str(tmp_path / "copy.pt"), str(tmp_path / "a.pt"))]
    assert [n["why"] for n in notes] == ["same path", "same file", "same content"]
    assert notes[2]["text"].startswith(f"--checkpoint {tmp_path / 'copy.pt'} has the same content as")
    assert result.metrics.groupby("image_id").size().nunique() == 1  # one value set per image, not several


def test_analysis_without_ratings_is_an_error(small_set: Path, tmp_path: Path) -> None:
    with pytest.raises(FluencyError, match="--analysis needs ratings"):
        fluency.run(metrics=["gini"], images=small_set / "images", analyses=["pearson"], out=tmp_path / "o",
                    progress=False)
    result = fluency.run(metrics=["gini"], images=small_set / "images", out=tmp_path / "p", progress=False)
    assert result.analyses == {} and len(result.metrics["image_id"].unique()) == 6


def test_ratings_as_parquet(small_set: Path, tmp_path: Path) -> None:
    pd.read_csv(small_set / "r.csv", dtype={"id": str}).to_parquet(small_set / "r.parquet")
    assert (run_small(small_set, tmp_path, "r.parquet").analyses["spearman"]["n"] == 6).all()


def test_relative_path_ids_and_shared_stems(small_set: Path, tmp_path: Path) -> None:
    shutil.copy(small_set / "images" / "a" / "1.png", small_set / "images" / "b" / "1.png")
    stems = run_small(small_set, tmp_path / "s")
    assert "1" in stems.report.ambiguous and "1" not in set(stems.analyses["pearson"].get("image_id", []))
    assert (stems.analyses["pearson"]["n"] == 5).all()
    pd.DataFrame({"id": ["a/1", "b/1", "a/2"], "beauty": [1.0, 2, 3]}).to_csv(small_set / "rel.csv", index=False)
    rel = run_small(small_set, tmp_path / "r", "rel.csv")
    assert rel.report.mode == "relpath-noext" and set(rel.report.matched) == {"a/1", "b/1", "a/2"}


@pytest.mark.parametrize("args, message", [
    (["--metric", "nosuch"], "unknown metric 'nosuch'"),
    (["--metric", "sam", "-o", "sam.rh=0.1"], "did you mean 'rho'"),
    (["--metric", "sam", "-o", "sam.rho=big"], "expected float"),
    (["--metric", "gini", "--checkpoint", "missing.pt"], "no such file"),
    (["--metric", "gini", "--layers", "enc9"], "unknown layer"),
    (["--metric", "gini", "--ratings", "x.csv"], "--ratings needs --images"),
])
def test_bad_command_lines_are_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = cli("run", *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_safety(tmp_path: Path, manager) -> None:
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, read_checkpoint
    from fluency.core.errors import CheckpointError

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "fluency-checkpoint", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a fluency checkpoint: it holds Python objects"):
        read_checkpoint(tmp_path / "evil.pt")
    payload = read_checkpoint(DEFAULT_CHECKPOINT)
    payload["architecture"]["name"] = "vae-huge"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="needs the architecture plugin 'vae-huge'"):
        load_checkpoint(tmp_path / "unknown.pt", manager)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a fluency checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")


def test_nan_activations_stop_the_run_naming_layer_and_images(tmp_path: Path, manager) -> None:
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, manager)
    with torch.no_grad():
        loaded.model.encoder[3].weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", loaded.model, "vae-small", **{k: v for k, v in loaded.info.items()
                                                                      if k not in ("format", "format_version",
                                                                                   "architecture")})
    with pytest.raises(FluencyError, match=r"NaN/Inf activations in layer 'enc2' for images \['stim-000'"):
        fluency.run(metrics=["gini"], checkpoints=[tmp_path / "nan.pt"], out=tmp_path / "o", progress=False)


def test_unknown_option_in_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[sam]\nrhoo = 0.1\n")
    with pytest.raises(OptionError, match="unknown option 'rhoo'"):
        fluency.run(metrics=["sam"], config=tmp_path / "c.toml", out=tmp_path / "o", progress=False)
    with pytest.raises(PluginError):
        fluency.run(metrics=["gini"], analyses=["nope"], images=None, out=tmp_path / "o2", progress=False)


def test_subgroup_analyses_report_small_groups_instead_of_failing(london_faces: Path, tmp_path: Path) -> None:
    result = fluency.run(metrics=["gini"], images=london_faces / "images", ratings=london_faces / "ratings.csv",
                         rating_column="attractiveness", by=["face_sex", "face_eth"], min_group_size=10,
                         out=tmp_path / "by", progress=False, store=False, covariates=False)  # raw p only
    groups = {g["group"]: g for g in result.manifest["subgroups"]["groups"]}
    assert groups["face_sex=female, face_eth=white"]["analysed"] and groups["all"]["n"] == 102
    small = groups["face_sex=male, face_eth=east_asian/white"]
    assert small["n"] == 1 and not small["analysed"] and "fewer than" in small["note"]
    pearson = result.analyses["pearson"]
    assert set(pearson["group"]) == {"all", "face_sex=female, face_eth=white", "face_sex=male, face_eth=white"}
    assert (pearson.loc[pearson.group == "face_sex=female, face_eth=white", "n"] == 35).all()
    both = pd.concat([result.analyses["pearson"], result.analyses["spearman"]], ignore_index=True)
    tested = both["p"].notna()
    assert tested.sum() > 0 and (both["same_as"] == "").all()
    assert np.allclose(both.loc[tested, "p_fdr"], multipletests(both.loc[tested, "p"], method="fdr_bh")[1],
                       rtol=1e-12, atol=0) and both.loc[~tested, "p_fdr"].isna().all()
    with pytest.raises(FluencyError, match="no column"):
        fluency.run(metrics=["gini"], images=london_faces / "images", ratings=london_faces / "ratings.csv",
                    rating_column="attractiveness", by=["nope"], out=tmp_path / "bad", progress=False, store=False)


def test_overwrite_clears_previous_outputs_and_same_stem_files_keep_both(small_set: Path, tmp_path: Path) -> None:
    first = fluency.run(metrics=["gini"], out=tmp_path / "ow", progress=False, store=False)
    assert (first.path / "analyses" / "spearman.parquet").exists()
    second = fluency.run(metrics=["lepsilon"], analyses=["pearson"], out=tmp_path / "ow", overwrite=True,
                         progress=False, store=False)
    assert not (second.path / "analyses" / "spearman.parquet").exists()
    Image.open(small_set / "images" / "a" / "1.png").save(small_set / "images" / "a" / "1.jpg")
    result = fluency.run(metrics=["gini"], images=small_set / "images", out=tmp_path / "ext", progress=False,
                         store=False)
    assert {"a/1.png", "a/1.jpg"} <= set(result.metrics["image_id"]) and result.metrics["image_id"].nunique() == 7


def test_non_finite_options_and_failing_plugin_code_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(OptionError, match="not a finite number"):
        fluency.run(metrics=["sam"], options=["sam.rho=nan"], out=tmp_path / "n", progress=False)
    from fluency.plugins.default_hoyer import Hoyer

    monkeypatch.setattr(Hoyer, "compute", lambda self, batch: 1 / 0)
    with pytest.raises(FluencyError, match=r"metric 'hoyer' \(fluency .*\) failed: ZeroDivisionError"):
        fluency.run(metrics=["hoyer"], out=tmp_path / "z", progress=False, store=False)


def test_checkpoint_labels_name_the_model_folder_even_for_relative_paths(tmp_path, monkeypatch) -> None:
    from fluency.core.run.checkpoints import labels as _labels

    (tmp_path / "models" / "sparse").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models" / "sparse")
    assert _labels([Path("final.pt"), Path("../sparse/final.pt"), Path("epoch-003.pt")]) == \
        ["sparse", "sparse-2", "epoch-003"]


def test_help_of_the_python_api_shows_every_setting_and_documents_it() -> None:
    import inspect
    from dataclasses import fields

    from fluency.core.run.config import RunConfig

    params = inspect.signature(fluency.run).parameters
    settings = [f.name for f in fields(RunConfig)]
    assert list(params)[:len(settings)] == settings and params["metrics"].default is inspect.Parameter.empty
    assert {"figures", "interpolate", "report", "progress", "console"} <= set(params)
    assert params["batch_size"].default == 32 and params["report"].default is True
    for name in params:
        assert f"``{name}``" in fluency.run.__doc__, f"fluency.run's docstring does not explain {name}"
