"""Replicate models: ``fluency train --seeds``, the replicate identity of checkpoints, and the analyses
aggregated per configuration (table, summary, --json, report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from cli_env import fluency_cli
from fluency.core.errors import FluencyError, OptionError
from fluency.core.inputs import demo
from fluency.core.model.checkpoint import describe_checkpoint, load_checkpoint, read_checkpoint
from fluency.core.model.replicates import configuration_id, differences, replicate_of
from fluency.core.outputs import figures
from fluency.core.outputs.summary import print_replicates
from fluency.core.plugin.analysis import EffectSize
from fluency.core.run.folder import RunResult, write_manifest
from fluency.core.run.replicates import COLUMNS, REPLICATES, aggregate, strongest, write_replicates
from fluency.core.train import training
from fluency.core.train.replicates import train_seeds
from fluency.core.train.seeds import MAX_SEEDS, RangeSpec

# --- --seeds -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seeds", [("1-10", list(range(1, 11))), ("1,3,5", [1, 3, 5]),
                                         ("1-3, 8,10-11", [1, 2, 3, 8, 10, 11]), ("0", [0]), ("7-7", [7])])
def test_seeds_are_ranges_and_single_values(text: str, seeds: list[int]) -> None:
    assert list(RangeSpec.parse(text)) == seeds


@pytest.mark.parametrize("text, says", [("", "give seeds"), ("3-1", "runs downwards"), ("a", "'a' is neither"),
                                        ("1-", "'1-' is neither"), ("-1", "'-1' is neither"),
                                        ("1,2,1", "seed 1 is listed twice"), ("4294967296", "too large"),
                                        (f"0-{MAX_SEEDS}", f"more than {MAX_SEEDS} seeds"), ("1.5", "neither")])
def test_a_malformed_seed_list_is_one_line_naming_the_problem(text: str, says: str) -> None:
    with pytest.raises(OptionError, match=says) as caught:
        RangeSpec.parse(text)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--seeds")


@pytest.mark.parametrize("extra, says", [(["--seeds", "1-2", "--seed", "3"], "--seeds and --seed"),
                                         (["--seeds", "1-2", "--by", "sex"], "--seeds and --by"),
                                         (["--seeds", "2-1"], "runs downwards"),
                                         (["--replicate-of", "a b"], "configuration label")])
def test_train_refuses_conflicting_seed_flags_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          extra: list[str], says: str) -> None:
    code, out, err = fluency_cli(monkeypatch, capsys, "train", "--images", str(tmp_path), "--out",
                                 str(tmp_path / "m"), *extra)
    assert code == 2 and says in err and "Traceback" not in err and not (tmp_path / "m").exists()


# --- replicate identity --------------------------------------------------------------------------------------


def _info(seed: int = 1, **changes: Any) -> dict[str, Any]:
    """A trained checkpoint's description (no weights), as training writes it."""
    config = {"images": f"/data/{seed}", "out": f"/out/seed-{seed}", "architecture": "vae-small", "epochs": 3,
              "batch_size": 8, "seed": seed, "device": "cpu", "figures": True, "checkpoint_every": 0, "lr": None,
              "options": [], "losses": ["l2"], "val_fraction": 0.1}
    config.update(changes.pop("config", {}))
    info = {"architecture": {"name": "vae-small", "options": {"latent_dim": 4}},
            "loss": {"terms": [{"name": "l2", "weight": 1.0, "options": {}}], "beta": 1.0},
            "optimizer": {"name": "adam", "options": {"lr": 0.001}}, "constraints": [],
            "data": {"images": f"/data/{seed}", "n_images": 24, "fingerprint": "f" * 64, "preprocessing": {"size": 32}},
            "provenance": {"seed": seed, "device": "cpu", "created": f"2025-01-0{seed}"},
            "training": {"config": config}}
    info.update(changes)
    return info


def test_checkpoints_differing_only_in_seed_paths_and_device_are_replicates() -> None:
    a, b = replicate_of(_info(1)), replicate_of(_info(2, config={"device": "cuda", "figures": False}))
    assert a == {"configuration": a["configuration"], "seed": 1} and b["seed"] == 2
    assert a["configuration"] == b["configuration"] and len(a["configuration"]) == 12
    int(a["configuration"], 16)


@pytest.mark.parametrize("changes, field", [
    ({"config": {"epochs": 4}}, "train.epochs"),
    ({"config": {"batch_size": 16}}, "train.batch_size"),
    ({"optimizer": {"name": "adam", "options": {"lr": 0.01}}}, "optimizer"),
    ({"architecture": {"name": "vae-small", "options": {"latent_dim": 8}}}, "architecture"),
    ({"constraints": [{"name": "kl-sparsity", "options": {}}]}, "constraints"),
    ({"data": {"images": "/data/1", "fingerprint": "e" * 64, "preprocessing": {"size": 32}}}, "data"),
])
def test_a_change_that_shapes_the_model_is_another_configuration(changes: dict[str, Any], field: str) -> None:
    other = _info(2, **changes)
    assert configuration_id(other) != configuration_id(_info(1))
    assert differences(_info(1), other) == [field]


def test_an_explicit_label_wins_and_models_without_training_are_not_replicates() -> None:
    labelled = _info(3, replicate={"configuration": "sparse-a"}, config={"epochs": 99})
    assert replicate_of(labelled) == {"configuration": "sparse-a", "seed": 3}
    assert replicate_of({"architecture": {"name": "vgg16-imagenet", "options": {}},
                         "weights": {"kind": "pretrained"}}) is None


# --- fluency train --seeds -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.export(tmp_path_factory.mktemp("demo"), n=24, size=32, seed=3) / "images"


TINY = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "-o", "vae-small.latent_dim=4", "--no-figures"]


@pytest.fixture(scope="module")
def seeded(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``fluency train --seeds 1-2`` once (the one real multi-seed training of this file): its folder, its JSON."""
    out = tmp_path_factory.mktemp("seeds") / "m"
    with pytest.MonkeyPatch.context() as monkeypatch:
        code = _cli_json(monkeypatch, ["train", "--images", str(images), "--out", str(out), *TINY, "--seeds", "1-2",
                                       "--json"], out.parent / "stdout.json")
    assert code == 0
    return out, json.loads((out.parent / "stdout.json").read_text())


def _cli_json(monkeypatch: pytest.MonkeyPatch, args: list[str], stdout: Path) -> int:
    """``fluency ARGS`` in this process with stdout written to ``stdout`` (module fixtures have no capsys)."""
    import contextlib
    import sys

    from fluency.cli import main

    monkeypatch.setattr(sys, "argv", ["fluency", *args])
    with open(stdout, "w") as fh, contextlib.redirect_stdout(fh):
        try:
            main()
        except SystemExit as exc:
            return int(exc.code or 0)
    return 0


def test_seeds_train_one_normal_model_per_seed_with_its_configuration(seeded: tuple[Path, dict[str, Any]],
                                                                      manager) -> None:
    out, summary = seeded
    assert [m["seed"] for m in summary["models"]] == [1, 2] and not any(m["skipped"] for m in summary["models"])
    assert json.loads((out / "replicates.json").read_text()) == summary
    records = []
    for seed in (1, 2):
        folder = out / f"seed-{seed}"
        assert {"final.pt", "last.pt", "history.parquet", "config.toml"} <= {p.name for p in folder.iterdir()}
        loaded = load_checkpoint(folder / "final.pt", manager)
        assert loaded.info["training"]["config"]["seed"] == seed
        records.append(replicate_of(loaded.info))
        # the id written at training time is the one computed from the saved checkpoint
        unlabelled = {k: v for k, v in loaded.info.items() if k != "replicate"}
        assert configuration_id(unlabelled) == loaded.info["replicate"]["configuration"]
    assert records == [{"configuration": summary["configuration"], "seed": 1},
                       {"configuration": summary["configuration"], "seed": 2}]
    assert describe_checkpoint(out / "seed-2" / "final.pt")["replicate"] == records[1]
    a, b = (read_checkpoint(out / f"seed-{s}" / "final.pt")["state_dict"] for s in (1, 2))
    assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # different seeds, different models


def _config(images: Path, out: Path, **kw: Any) -> training.TrainConfig:
    return training.TrainConfig(**{"images": str(images), "out": str(out), "epochs": 1, "batch_size": 8,
                                   "image_size": 32, "figures": False, "options": ["vae-small.latent_dim=4"], **kw})


def test_the_same_command_again_skips_finished_seeds_and_resumes_an_interrupted_one(
        seeded: tuple[Path, dict[str, Any]], images: Path, tmp_path: Path, manager) -> None:
    out = tmp_path / "m"
    shutil.copytree(seeded[0], out)
    before = (out / "seed-1" / "final.pt").stat().st_mtime_ns
    (out / "seed-2" / "final.pt").unlink()  # killed after seed 2's last epoch, before its final.pt
    notes = Console(record=True, width=200)
    with pytest.raises(FluencyError, match="seed 2 was interrupted; pass --resume"):
        train_seeds(_config(images, out), [1, 2], manager=manager, console=notes)
    summary = train_seeds(_config(images, out), [1, 2], manager=manager, console=notes, resume=True)
    assert [m["skipped"] for m in summary["models"]] == [True, False]
    assert (out / "seed-1" / "final.pt").stat().st_mtime_ns == before and (out / "seed-2" / "final.pt").exists()
    said = notes.export_text()
    assert "seed 1 (1/2):" in said and "exists; skipped" in said
    assert summary["configuration"] == seeded[1]["configuration"]
    # another configuration into the same folder is refused, naming what differs
    with pytest.raises(FluencyError, match=r"another configuration .*differ in train\.epochs"):
        train_seeds(_config(images, out, epochs=2), [1, 2], manager=manager, console=notes)


def test_an_explicit_label_is_written_into_the_checkpoint(images: Path, tmp_path: Path, manager) -> None:
    result = training.train(_config(images, tmp_path / "m", seed=5), manager=manager, replicate_label="sparse-a")
    assert result.configuration == "sparse-a"
    assert replicate_of(read_checkpoint(result.checkpoint)) == {"configuration": "sparse-a", "seed": 5}


# --- aggregation ---------------------------------------------------------------------------------------------

EFFECTS = {("pearson", "r"): EffectSize("r", "Pearson r", "correlation"),
           ("pearson", "r_diff"): EffectSize("r_diff", "r_A − r_B", "difference", None, False),
           ("ridge", "r2_pooled"): EffectSize("r2_pooled", "CV R²", "r2", None, False, False)}
#: label → (configuration, seed); "lone" is a configuration of one model, "vgg" a model without training
MODELS = {"a-1": ("cfgA", 1), "a-2": ("cfgA", 2), "a-3": ("cfgA", 3), "b-7": ("cfgB", 7), "b-8": ("cfgB", 8),
          "lone": ("cfgC", 1), "vgg": None}


def _manifest() -> dict[str, Any]:
    checkpoints = [{"label": label, "sha256": label * 4, "path": f"/m/{label}.pt",
                    **({"replicate": {"configuration": r[0], "seed": r[1]}} if r else {})}
                   for label, r in MODELS.items()]
    return {"run_id": "r", "status": "complete", "inputs": {"checkpoints": checkpoints},
            "analysis_effects": {name: [e.as_dict() for (a, _), e in EFFECTS.items() if a == name]
                                 for name in ("pearson", "ridge")},
            "timings": {"total": 1.0}, "metric_columns": {}, "metrics": ["gini", "hoyer"], "analyses": ["pearson",
                                                                                                       "ridge"]}


def _analyses() -> dict[str, pd.DataFrame]:
    """Per-model tables as the analyses write them (random estimates), with rows the aggregation must leave
    out (a pair's difference, a repeated test) and one NaN estimate."""
    rng = np.random.default_rng(4)
    pearson = pd.DataFrame([{"analysis": "pearson", "checkpoint": c, "metric": m, "layer": layer, "n": 60,
                             "statistic": "r", "estimate": rng.uniform(-0.6, 0.6), "p": 0.01,
                             "p_fdr": rng.choice([0.001, 0.2]), "group": g, "same_as": None}
                            for c in MODELS for m in ("gini", "hoyer") for layer in ("enc1", "enc2")
                            for g in ("all", "sex=f")])
    pearson.loc[3, "estimate"] = np.nan
    pearson.loc[5, "same_as"] = "gini"
    pair = pd.DataFrame([{"analysis": "pearson", "checkpoint": "a-1−a-2", "metric": "gini", "layer": "enc1", "n": 60,
                          "statistic": "r_diff", "estimate": 0.1, "p": 0.5, "p_fdr": 0.6, "group": "all"}])
    ridge = pd.DataFrame([{"analysis": "ridge", "checkpoint": c, "metric": m, "layer": None, "n": 60,
                           "statistic": "r2_pooled", "estimate": rng.uniform(0, 0.3), "p": 0.02,
                           "p_fdr": rng.choice([0.01, 0.3]), "group": "all"} for c in MODELS for m in ("gini", "hoyer")])
    return {"pearson": pd.concat([pearson, pair], ignore_index=True), "ridge": ridge}


def _oracle(analyses: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The aggregation computed by hand with pandas and numpy."""
    rows = pd.concat(analyses.values(), ignore_index=True)
    owner = {label: r[0] for label, r in MODELS.items() if r and r[0] in ("cfgA", "cfgB")}
    rows = rows[rows["checkpoint"].isin(owner) & rows.get("same_as").isna() & rows["estimate"].notna()]
    rows = rows.assign(configuration=rows["checkpoint"].map(owner), layer=rows["layer"].fillna("-"))
    out = []
    for key, g in rows.groupby(["configuration", "analysis", "group", "metric", "layer", "statistic"]):
        x = g["estimate"].to_numpy(float)
        out.append(dict(zip(["configuration", "analysis", "group", "metric", "layer", "statistic"], key),
                        n_models=len(x), mean=x.mean(), sd=np.std(x, ddof=1), min=x.min(), max=x.max(),
                        mean_r2=(x ** 2).mean() if key[5] == "r" else x.mean(),
                        n_significant=int((g["p_fdr"] < 0.05).sum())))
    return pd.DataFrame(out)


def test_each_configuration_of_two_or_more_models_is_aggregated_per_test() -> None:
    analyses = _analyses()
    got = aggregate(analyses, _manifest(), EFFECTS)
    assert list(got.columns) == list(COLUMNS)
    assert set(got["configuration"]) == {"cfgA", "cfgB"} and set(got["statistic"]) == {"r", "r2_pooled"}
    expected = _oracle(analyses)
    merged = got.assign(layer=got["layer"].fillna("-")).merge(
        expected, on=["configuration", "analysis", "group", "metric", "layer", "statistic"], suffixes=("", "_o"))
    assert len(merged) == len(got) == len(expected)
    for column in ("n_models", "mean", "sd", "min", "max", "mean_r2", "n_significant"):
        np.testing.assert_allclose(merged[column].to_numpy(float), merged[f"{column}_o"].to_numpy(float),
                                   rtol=1e-12, err_msg=column)
    assert set(got.loc[got["configuration"] == "cfgA", "seeds"]) >= {"1,2,3"}
    assert (got["n_tested"] == got["n_models"]).all()


def test_the_table_is_written_beside_analyses_and_removed_when_no_configuration_remains(tmp_path: Path) -> None:
    path = write_replicates(tmp_path, _analyses(), _manifest(), EFFECTS)
    assert path == tmp_path / REPLICATES and not (tmp_path / "analyses").exists()
    assert len(pd.read_parquet(path)) == len(aggregate(_analyses(), _manifest(), EFFECTS))
    single = {**_manifest(), "inputs": {"checkpoints": _manifest()["inputs"]["checkpoints"][:1]}}
    assert write_replicates(tmp_path, _analyses(), single, EFFECTS) is None and not path.exists()


def _result(tmp_path: Path) -> RunResult:
    metrics = pd.DataFrame({"image_id": ["i1", "i2"], "checkpoint": "a-1", "metric": "gini", "layer": "enc1",
                            "value": [0.1, 0.2]})
    return RunResult(tmp_path, metrics, _analyses(), _manifest())


def test_the_summary_section_fits_80_columns_and_says_mean_sd_and_significant_models(tmp_path: Path) -> None:
    result = _result(tmp_path)
    table = result.replicates()
    rows = strongest(table, top=3)
    assert set(rows.groupby(["configuration", "kind"]).size()) == {3, 2}  # 3 correlations, both R² rows
    console = Console(record=True, width=80)
    print_replicates(console, rows, result.effects())
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "cfgA: 3 models, seeds 1-3" in text and "cfgB: 2 models, seeds 7,8" in text
    first = rows.iloc[0]
    assert f" {first['mean']:+.3f} ± {first['sd']:.3f} " in text
    assert f"{first['n_significant']}/{first['n_tested']}" in text


def test_json_summary_holds_every_aggregated_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fluency.cli import _print_result

    result = _result(tmp_path)
    _print_result(result, 10, True)
    found = json.loads(capsys.readouterr().out)["replicates"]
    assert len(found) == len(result.replicates()) and {"mean", "sd", "n_significant"} <= set(found[0])


def test_the_report_has_a_replicate_table_and_figure(tmp_path: Path) -> None:
    from fluency.core.outputs.report import build_report

    (tmp_path / "analyses").mkdir()
    for name, table in _analyses().items():
        table.to_parquet(tmp_path / "analyses" / f"{name}.parquet")
    write_manifest(tmp_path, _manifest())
    page = build_report(tmp_path).read_text()
    assert "<h2>Replicate models</h2>" in page and 'id="table-replicates"' in page
    assert (tmp_path / "figures" / "replicates-pearson-r.png").exists()
    assert (tmp_path / "figures" / "replicates-ridge-r2_pooled.png").exists()
    assert page.count("<tr") - 1 >= len(aggregate(_analyses(), _manifest(), EFFECTS))


def test_replicate_figure_text_is_at_least_10_pixels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    built: list[Any] = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: built.append(fig))
    table = aggregate(_analyses(), _manifest(), EFFECTS)
    figures.replicate_dots(table[(table["statistic"] == "r") & (table["group"] == "all")], tmp_path / "r.png",
                           "pearson: Pearson r")
    fig = built[0]
    fig.canvas.draw()
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    assert any("cfgA (3 models)" in t.get_text() for t in texts)
    assert not [t.get_text() for t in texts if t.get_fontsize() * figures.DPI / 72 < 10]


def test_measure_and_report_on_a_run_of_replicates_keep_the_aggregate_current(
        seeded: tuple[Path, dict[str, Any]], images: Path, tmp_path: Path) -> None:
    """A real run of the two seeds' models: the run marks them as replicates and aggregates them;
    ``fluency measure`` then adds a metric in place: the aggregate is recomputed with it, and the report
    builds."""
    import fluency
    from fluency.core.outputs.report import build_report
    from fluency.core.run.folder import read_manifest

    out = seeded[0]
    run = fluency.run(metrics=["gini"], images=images, ratings=images.parent / "ratings.csv", analyses=["pearson"],
                      checkpoints=[out / "seed-1" / "final.pt", out / "seed-2" / "final.pt"], out=tmp_path / "run",
                      covariates=False, figures=False, report=False, progress=False)
    manifest = read_manifest(run.path)  # the run marks each checkpoint's configuration and aggregates them
    assert [e["replicate"] for e in manifest["inputs"]["checkpoints"]] == [
        replicate_of(read_checkpoint(e["path"])) for e in manifest["inputs"]["checkpoints"]]
    assert set(pd.read_parquet(run.path / REPLICATES)["metric"]) == {"gini"}
    measured = fluency.measure(run.path, ["hoyer"], progress=False)
    table = pd.read_parquet(run.path / REPLICATES)
    assert set(table["metric"]) == {"gini", "hoyer"} and set(table["n_models"]) == {2}
    assert set(table["configuration"]) == {seeded[1]["configuration"]}
    pd.testing.assert_frame_equal(table, measured.replicates(), check_dtype=False)
    assert "<h2>Replicate models</h2>" in build_report(run.path).read_text()
