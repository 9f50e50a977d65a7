"""Confounds in every answer: relations raw and controlling for the image-stats covariates (issue 13, point 3).

Oracles: statsmodels OLS (residuals, the metric's coefficient p, R² and adjusted R²), scikit-learn's own
``cross_val_predict`` on the same folds for ΔR², statsmodels' ``multipletests`` for the run-wide BH family.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from PIL import Image
from scipy import stats
from statsmodels.stats.multitest import multipletests

from fluency.core.plugin.analysis import AnalysisData
from fluency.core.plugin.metric_columns import MetricColumns
from fluency.core.run.analyse import _write_with_fdr
from fluency.core.run.covariates import Covariates
from fluency.plugins.default_correlation import Pearson, Spearman
from fluency.plugins.default_ridge import Ridge

NAMES = ("luminance", "rms-contrast", "jpeg-bpp")


def confounded(n: int = 60, seed: int = 0, noise_columns: int = 0) -> AnalysisData:
    """A metric that relates to the rating mostly through the covariates (and a little on its own)."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k:03d}" for k in range(n)]
    z = rng.normal(size=(n, len(NAMES)))
    rating = z @ np.array([1.0, -0.5, 0.8]) + rng.normal(size=n)
    metric = z @ np.array([0.7, 0.3, -0.2]) + 0.4 * rating + rng.normal(size=n)
    rows = [pd.DataFrame({"image_id": ids, "checkpoint": "default", "metric": "m", "layer": layer,
                          "value": metric + 0.1 * rng.normal(size=n)}) for layer in ("enc1", "enc2")]
    rows += [pd.DataFrame({"image_id": ids, "checkpoint": "default", "metric": "noise", "layer": f"n{j}",
                           "value": rng.normal(size=n)}) for j in range(noise_columns)]
    covariates = pd.DataFrame({"checkpoint": "default", "image_id": ids, **dict(zip(NAMES, z.T))})
    ratings = pd.DataFrame({"image_id": ids, "rating": rating})
    return AnalysisData(pd.concat(rows, ignore_index=True), ratings, "rating", covariates)


def _oracle(data: AnalysisData, layer: str, rank: bool) -> tuple[float, float]:
    """Partial r by residualising both on the covariates (statsmodels OLS) and its p: the p of the metric's
    coefficient in rating ~ metric + covariates (the same t test, n − 2 − k df)."""
    m = data.metrics[(data.metrics["metric"] == "m") & (data.metrics["layer"] == layer)]
    frame = m.merge(data.ratings, on="image_id").merge(data.covariates, on="image_id")
    x, y, z = frame["value"].to_numpy(), frame["rating"].to_numpy(), frame[list(NAMES)].to_numpy()
    if rank:
        x, y, z = stats.rankdata(x), stats.rankdata(y), np.column_stack([stats.rankdata(c) for c in z.T])
    design = sm.add_constant(z)
    r = np.corrcoef(sm.OLS(x, design).fit().resid, sm.OLS(y, design).fit().resid)[0, 1]
    full = sm.OLS(y, sm.add_constant(np.column_stack([x, z]))).fit()
    return float(r), float(full.pvalues[1])


@pytest.mark.parametrize("analysis, rank", [(Pearson, False), (Spearman, True)])
def test_partial_relation_given_covariates_equals_residualisation(analysis, rank) -> None:
    data = confounded()
    table = analysis(n_boot=0).run(data).set_index("layer")
    raw = table.loc["enc1"]
    for layer in ("enc1", "enc2"):
        r, p = _oracle(data, layer, rank)
        assert table.loc[layer, "estimate_adj"] == pytest.approx(r, abs=1e-12)
        assert table.loc[layer, "p_adj"] == pytest.approx(p, rel=1e-9)
    assert abs(raw["estimate_adj"]) < abs(raw["estimate"])  # the confound carried most of the relation
    assert raw["covariates"] == ",".join(NAMES)


def test_a_covariate_is_not_adjusted_for_itself() -> None:
    data = confounded()
    extra = data.covariates.rename(columns={"luminance": "value"})[["image_id", "checkpoint", "value"]]
    data.metrics = pd.concat([data.metrics, extra.assign(metric="luminance", layer=None)], ignore_index=True)
    table = Pearson(n_boot=0).run(data)
    row = table[table["metric"] == "luminance"].iloc[0]
    assert np.isfinite(row["estimate"]) and np.isnan(row["estimate_adj"]) and np.isnan(row["p_adj"])


def test_without_covariates_the_columns_are_todays() -> None:
    data = confounded()
    data.covariates = None
    for analysis in (Pearson, Spearman):
        assert "estimate_adj" not in analysis(n_boot=0).run(data).columns
    assert not {"estimate_adj", "r2_covariates"} & set(Ridge(permutations=0, repeats=1).run(data).columns)


def _pooled_r2(x: np.ndarray, y: np.ndarray, folds: int, repeats: int, seed: int, alphas: np.ndarray) -> float:
    """scikit-learn's own cross_val_predict on the same KFold splits, pooled R² averaged over repeats."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
    return float(np.mean([r2_score(y, cross_val_predict(model, x, y, cv=KFold(folds, shuffle=True,
                                                                                random_state=seed + r)))
                          for r in range(repeats)]))


def test_ridge_delta_r2_equals_sklearn_on_the_same_folds_and_in_sample_r2_equals_statsmodels() -> None:
    data = confounded(n=50)
    opts = {"folds": 5, "repeats": 2, "permutations": 19, "seed": 3}
    table = Ridge(**opts).run(data).set_index("metric")
    row = table.loc["m"]
    wide = data.metrics[data.metrics["metric"] == "m"].pivot(index="image_id", columns="layer", values="value")
    y = data.ratings.set_index("image_id")["rating"].reindex(wide.index).to_numpy()
    z = data.covariates.set_index("image_id")[list(NAMES)].reindex(wide.index).to_numpy()
    x = wide.to_numpy()
    alphas = np.logspace(-3, 4, 30)
    r2_z = _pooled_r2(z, y, 5, 2, 3, alphas)
    r2_zx = _pooled_r2(np.column_stack([z, x]), y, 5, 2, 3, alphas)
    assert row["r2_covariates"] == pytest.approx(r2_z, abs=1e-12)
    assert row["estimate_adj"] == pytest.approx(r2_zx - r2_z, abs=1e-12)
    assert row["estimate"] == pytest.approx(_pooled_r2(x, y, 5, 2, 3, alphas), abs=1e-12)
    assert 1 / 20 <= row["p_adj"] <= 1
    fit = sm.OLS(y, sm.add_constant(x)).fit()
    assert row["r2_in_sample"] == pytest.approx(fit.rsquared, abs=1e-12)
    assert row["r2_adj_in_sample"] == pytest.approx(fit.rsquared_adj, abs=1e-12)


def test_ridge_delta_r2_is_fitted_inside_the_folds() -> None:
    """Thirty pure-noise columns on 40 images: honestly they add nothing out of sample (ΔR² < 0, p not small);
    a ΔR² whose features were fitted on all images (leakage) would be positive."""
    data = confounded(n=40, seed=1, noise_columns=30)
    row = Ridge(folds=5, repeats=1, permutations=9).run(data).set_index("metric").loc["noise"]
    assert row["estimate_adj"] < 0 and row["p_adj"] > 0.2
    assert row["r2_in_sample"] > 0.5  # the in-sample figure of the same noise looks impressive


def test_adjusted_tests_join_the_run_wide_bh_family(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a = pd.DataFrame({"p": rng.uniform(size=6) ** 3, "p_adj": rng.uniform(size=6)})
    a.loc[2, "p_adj"] = np.nan
    b = pd.DataFrame({"p": rng.uniform(size=4) ** 2})
    _write_with_fdr({"a": a, "b": b}, tmp_path)
    pooled = np.concatenate([a["p"], b["p"], a["p_adj"]])
    ok = np.isfinite(pooled)
    expected = np.full(len(pooled), np.nan)
    expected[ok] = multipletests(pooled[ok], method="fdr_bh")[1]
    got = np.concatenate([a["p_fdr"], b["p_fdr"], a["p_adj_fdr"]])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert pd.read_parquet(tmp_path / "a.parquet")["p_adj_fdr"].notna().sum() == 5


def test_covariates_split_keeps_them_out_of_the_tested_table() -> None:
    table = pd.DataFrame({"image_id": ["a", "b", "a", "b"], "checkpoint": "c", "metric": ["gini", "gini", "luminance",
                          "luminance"], "layer": ["enc1", "enc1", None, None], "value": [1.0, 2.0, 0.3, 0.4]})
    tested, wide = Covariates(("luminance",), requested=False).split(MetricColumns.from_long(table))
    assert tested.outputs() == [("c", "gini", "enc1")]
    assert list(wide.columns) == ["checkpoint", "image_id", "luminance"]
    assert wide.set_index("image_id")["luminance"].to_dict() == {"a": 0.3, "b": 0.4}
    tested, _ = Covariates(("luminance",), requested=True).split(MetricColumns.from_long(table))
    assert {m for _, m, _ in tested.outputs()} == {"gini", "luminance"}


@pytest.fixture(scope="module")
def rated_folder(tmp_path_factory: pytest.TempPathFactory):
    """16 small images whose rating follows their brightness (a low-level confound) plus noise."""
    root = tmp_path_factory.mktemp("covariates")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(16):
        level = rng.uniform(0.1, 0.9)
        pixels = np.clip(level + 0.15 * rng.normal(size=(32, 32, 3)), 0, 1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / f"img{k:02d}.png")
        rows.append({"image_id": f"img{k:02d}", "rating": 3 * level + 0.2 * rng.normal()})
    pd.DataFrame(rows).to_csv(root / "ratings.csv", index=False)
    return root


def _run(folder, out, **settings):
    from fluency.core.run.pipeline import run

    return run(metrics=["hoyer"], images=folder, ratings=folder / "ratings.csv", out=out, progress=False,
               analyses=["pearson", "spearman"], options=["pearson.n_boot=50", "spearman.n_boot=50"],
               store=True, **settings)


def test_run_controls_for_image_stats_and_no_covariates_gives_raw_only(rated_folder, tmp_path) -> None:
    on = _run(rated_folder, tmp_path / "on")
    off = _run(rated_folder, tmp_path / "off", covariates=False)
    assert on.manifest["covariates"] == {"plugin": "image-stats", "requested": False,
                                        "columns": ["luminance", "rms-contrast", "spectral-slope", "edge-density",
                                                    "jpeg-bpp"]}
    assert "covariates" not in off.manifest and "image-stats" not in off.manifest["metrics"]
    assert set(off.metrics["metric"]) == {"hoyer"} and "luminance" in set(on.metrics["metric"])
    for name in ("pearson", "spearman"):
        raw_columns = ["analysis", "checkpoint", "metric", "layer", "n", "statistic", "estimate", "p", "ci_low",
                       "ci_high", "note", "group", "same_as", "p_fdr"]
        assert list(off.analyses[name].columns) == raw_columns  # the raw table, without adjusted columns
        assert set(on.analyses[name]["metric"]) == {"hoyer"}  # the covariates are not hypotheses
        pd.testing.assert_frame_equal(on.analyses[name][raw_columns[:-1]], off.analyses[name][raw_columns[:-1]])
    # the adjusted estimate from the run's own metric table, by hand
    def column(metric: str, layer: str | None = None) -> np.ndarray:
        rows = on.metrics[(on.metrics["metric"] == metric) & (on.metrics["layer"].isna() if layer is None else
                                                              on.metrics["layer"] == layer)]
        return rows.set_index("image_id")["value"].sort_index().to_numpy()

    z = np.column_stack([column(c) for c in on.manifest["covariates"]["columns"]])
    x = column("hoyer", "enc1")
    ratings = pd.read_csv(rated_folder / "ratings.csv").set_index("image_id")["rating"].sort_index()
    row = on.analyses["pearson"][on.analyses["pearson"]["layer"] == "enc1"].iloc[0]
    design = sm.add_constant(z)
    r = np.corrcoef(sm.OLS(x, design).fit().resid, sm.OLS(ratings.to_numpy(), design).fit().resid)[0, 1]
    assert row["estimate_adj"] == pytest.approx(r, abs=1e-9)


def test_measure_without_images_reports_raw_and_says_why(rated_folder, tmp_path) -> None:
    from rich.console import Console

    from fluency.core.run.measure import measure

    off = _run(rated_folder, tmp_path / "run", covariates=False)
    console = Console(record=True, width=200)
    result = measure(off.path, ["lepsilon"], console=console)
    said = console.export_text()
    assert "relations are raw" in said and "--images DIR" in said
    assert "estimate_adj" not in result.analyses["pearson"].columns
    again = measure(off.path, ["gini"], images=rated_folder,
                    console=Console(record=True, width=200))
    assert again.manifest["covariates"]["requested"] is False
    assert again.analyses["pearson"]["estimate_adj"].notna().any()
    assert set(again.analyses["pearson"]["metric"]) == {"hoyer", "lepsilon", "lepsilon-fraction", "gini"}


def test_delta_r2_of_a_metric_that_only_copies_a_covariate_is_not_significant() -> None:
    """The metric is luminance plus noise: raw it predicts the rating well (p small), over the covariates it adds
    nothing (p_adj not small). Permuting the covariates with the metric would break their own relation with the
    rating and make this p_adj tiny."""
    data = confounded(n=60, seed=2)
    z = data.covariates.set_index("image_id")
    copy = z["luminance"] + 0.3 * np.random.default_rng(5).normal(size=len(z))
    data.metrics = pd.DataFrame({"image_id": z.index, "checkpoint": "default", "metric": "copy", "layer": "enc1",
                                 "value": copy.to_numpy()})
    row = Ridge(folds=5, repeats=1, permutations=19).run(data).iloc[0]
    assert row["estimate"] > 0.1 and row["p"] == pytest.approx(1 / 20)
    assert abs(row["estimate_adj"]) < 0.05 and row["p_adj"] > 0.2


def test_partial_names_a_covariate_the_run_computed() -> None:
    from fluency.plugins.default_correlation import Partial

    data = confounded()
    row = Partial(covariates=list(NAMES)).run(data).set_index("layer").loc["enc1"]
    assert row["estimate"] == pytest.approx(_oracle(data, "enc1", rank=False)[0], abs=1e-12)


def test_the_readmes_demo_numbers_as_written(tmp_path, monkeypatch) -> None:
    """Every command of the README's "What the demo shows" block, run as written; the numbers it states
    (two runs of the embedded default, about 20 s on 2 quiet cores)."""
    import shlex
    from pathlib import Path

    from click.testing import CliRunner

    from fluency.cli import cli as fluency_cli

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### What the demo shows"):]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    for command in block.strip().splitlines():
        args = shlex.split(command)
        assert args[0] == "fluency", command
        result = CliRunner().invoke(fluency_cli, [*args[1:], "--no-report"] if args[1] == "run" else args[1:],
                                    catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
    pearson = pd.read_parquet(tmp_path / "runs/demo/analyses/pearson.parquet").set_index(["metric", "layer"],
                                                                                           drop=False)
    partial = pd.read_parquet(tmp_path / "runs/demo/analyses/partial.parquet").set_index(["metric", "layer"],
                                                                                           drop=False)
    sam, gini = pearson.xs("sam", level=0).iloc[0], pearson.loc[("gini", "all")]
    assert round(pearson.xs("jpeg-bpp", level=0).iloc[0]["estimate"], 3) == -0.855
    assert (round(sam["estimate"], 3), round(sam["estimate_adj"], 3), round(sam["p_adj_fdr"], 2)) == (-0.391, -0.066,
                                                                                                      0.39)
    assert round(partial.xs("sam", level=0).iloc[0]["estimate"], 3) == 0.056
    assert (round(gini["estimate"], 3), round(gini["estimate_adj"], 3), round(gini["p_adj_fdr"], 2)) == (-0.743, -0.057,
                                                                                                        0.42)
    assert round(partial.loc[("gini", "all")]["estimate"], 3) == -0.191
    untrained = pd.read_parquet(tmp_path / "runs/demo-untrained/analyses/pearson.parquet")
    flipped = untrained[untrained["metric"] == "sam"].iloc[0]
    assert (round(flipped["estimate"], 3), round(flipped["estimate_adj"], 3)) == (0.725, 0.097)
