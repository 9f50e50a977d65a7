"""One hypothesis, one test: outputs with affine-identical values enter the run-wide FDR family once, and
``partial`` does not test a metric that is one of its covariates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from fluency.core.plugin.analysis import AnalysisData
from fluency.core.plugin.manager import PluginManager
from fluency.core.run.analyse import analyse
from fluency.core.run.same_tests import same_tests
from fluency.plugins.default_correlation import COVARIATE_NOTE, Partial

N = 40


def table(checkpoints=("ck",), seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per checkpoint: ``count`` on layers l1, l2 and ``fraction`` = count / units (per layer); ``a`` and ``b`` =
    3 − 2a (an affine map with a negative slope); ``near`` = a + noise of 1e-3 of its spread (not the same);
    ``c`` unrelated. The rating depends on ``a``."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k:02d}" for k in range(N)]
    rows = []
    for j, checkpoint in enumerate(checkpoints):
        a = rng.normal(size=N)
        count = {"l1": rng.integers(0, 500, N).astype(float), "l2": rng.integers(0, 90, N).astype(float)}
        series = [("count", "l1", count["l1"]), ("count", "l2", count["l2"]),
                  ("a", None, a), ("b", None, 3 - 2 * a), ("near", None, a + 1e-3 * rng.normal(size=N)),
                  ("c", None, rng.normal(size=N)),
                  ("fraction", "l1", count["l1"] / 512), ("fraction", "l2", count["l2"] / 96)]
        for metric, layer, values in series:
            rows.append(pd.DataFrame({"image_id": ids, "checkpoint": checkpoint, "metric": metric, "layer": layer,
                                      "value": values}))
    ratings = pd.DataFrame({"image_id": ids, "beauty": a + rng.normal(size=N)})
    return pd.concat(rows, ignore_index=True), ratings


def run_analyses(metrics: pd.DataFrame, ratings: pd.DataFrame, out: Path, **options: dict) -> dict[str, pd.DataFrame]:
    manager = PluginManager(autoload=False)
    names = ["pearson", "spearman", "ridge", *options.get("extra", [])]
    specs = {name: manager.get("analysis", name) for name in names}
    settings = {"pearson": {"n_boot": 0}, "spearman": {"n_boot": 0},
                "ridge": {"permutations": 9, "repeats": 1, "folds": 4}, **options.get("settings", {})}
    resolved = {("analysis", name): specs[name].resolve(settings.get(name, {})) for name in names}
    out.mkdir()
    return analyse(metrics, ratings, "beauty", specs, resolved, out, manager).results


def bh_over_tested(results: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, np.ndarray]:
    """Every row, and statsmodels' BH over the p-values of the rows that are tested once (no ``same_as``)."""
    every = pd.concat(results.values(), ignore_index=True)
    once = every[(every["same_as"] == "") & np.isfinite(every["p"])]
    return every, pd.Series(multipletests(once["p"], method="fdr_bh")[1], index=once.index).reindex(every.index)


def test_affine_identical_outputs_are_tested_once(tmp_path: Path) -> None:
    metrics, ratings = table()
    results = run_analyses(metrics, ratings, tmp_path / "run")
    pearson = results["pearson"].set_index(["metric", "layer"], drop=False)
    # the first output in the table's order is kept; the later affine maps name it
    expected = {("fraction", "l1"): "count@l1", ("fraction", "l2"): "count@l2", ("b", None): "a"}
    for row in pearson.itertuples():
        key = (row.metric, None if pd.isna(row.layer) else row.layer)
        assert row.same_as == expected.get(key, ""), key
        if key in expected:
            assert np.isnan(row.p_fdr) and "same test as" in row.note
            kept = pearson[(pearson.metric == expected[key].split("@")[0])].iloc[0 if key[1] in (None, "l1") else 1]
            assert abs(row.estimate) == pytest.approx(abs(kept.estimate), abs=1e-12)  # the same test indeed
            assert row.p == pytest.approx(kept.p, rel=1e-9)
    assert pearson.loc[("near", None), "same_as"] == "" and np.isfinite(pearson.loc[("near", None), "p_fdr"])
    # ridge of the whole metric: every layer of `fraction` is one of `count`'s, one to one
    ridge = results["ridge"].set_index("metric")
    assert ridge.loc["fraction", "same_as"] == "count" and np.isnan(ridge.loc["fraction", "p_fdr"])
    assert ridge.loc["b", "same_as"] == "a" and ridge.loc["count", "same_as"] == ""
    # p_fdr is one BH over every test of the run, each counted once (statsmodels as the oracle)
    every, oracle = bh_over_tested(results)
    assert every["same_as"].ne("").sum() == 2 * 3 + 2  # pearson, spearman: 3 rows each; ridge: 2 rows
    assert np.allclose(every["p_fdr"], oracle, rtol=1e-12, atol=0, equal_nan=True)
    saved = pd.read_parquet(tmp_path / "run" / "analyses" / "spearman.parquet")
    assert saved["same_as"].tolist() == results["spearman"]["same_as"].tolist()


def test_only_outputs_of_one_checkpoint_are_merged_and_comparisons_follow(tmp_path: Path) -> None:
    metrics, ratings = table(("A", "B"))
    b_fraction_l1 = (metrics.checkpoint == "B") & (metrics.metric == "fraction") & (metrics.layer == "l1")
    metrics.loc[b_fraction_l1, "value"] = np.random.default_rng(9).uniform(size=N)  # B: no longer count / 512
    same = same_tests(metrics, ratings["image_id"])
    assert same.same_as("A", "fraction", "l2") == "count@l2" and same.same_as("B", "b", None) == "a"
    assert same.same_as("A", "fraction", "l1") == "count@l1" and same.same_as("B", "fraction", "l1") == ""
    # B's `a` is not A's `a` (different values); a copy of A under another name is a different model: kept
    copy = metrics[metrics.checkpoint == "A"].assign(checkpoint="A2")
    assert same_tests(pd.concat([metrics, copy]), ratings["image_id"]).same_as("A2", "a", None) == ""
    results = run_analyses(metrics, ratings, tmp_path / "run")
    diff = results["pearson"][results["pearson"].statistic == "r_diff"].set_index(["metric", "layer"])
    assert diff.loc[("fraction", "l2"), "same_as"] == "count@l2" and np.isnan(diff.loc[("fraction", "l2"), "p_fdr"])
    # A−B of fraction@l1 compares count@l1 under A with another variable under B: a test of its own
    assert diff.loc[("fraction", "l1"), "same_as"] == "" and np.isfinite(diff.loc[("fraction", "l1"), "p_fdr"])
    assert diff.loc[("count", "l1"), "same_as"] == "" and np.isfinite(diff.loc[("count", "l1"), "p_fdr"])
    every, oracle = bh_over_tested(results)
    assert np.allclose(every["p_fdr"], oracle, rtol=1e-12, atol=0, equal_nan=True)


def test_constant_short_and_differently_missing_outputs_are_not_merged() -> None:
    ids = [f"i{k}" for k in range(6)]
    x = np.arange(6.0)

    def frame(metric: str, values: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"image_id": ids, "checkpoint": "ck", "metric": metric, "layer": None, "value": values})

    holed = 2 * x
    holed[3] = np.nan
    metrics = pd.concat([frame("x", x), frame("const", np.ones(6)), frame("const2", np.full(6, 2.0)),
                         frame("holed", holed), frame("twice", 2 * x)])
    same = same_tests(metrics, ids)
    assert [same.same_as("ck", m, None) for m in ("const", "const2", "holed", "twice")] == ["", "", "", "x"]
    assert same_tests(metrics, ids[:2]).same_as("ck", "twice", None) == ""  # 2 images: any two lines are affine
    # float32 round-off of an affine map (e.g. elbo-recon against recon-l2) is still the same test
    narrow = np.random.default_rng(1).uniform(0.01, 0.02, 50).astype(np.float32)
    rounded = pd.concat([pd.DataFrame({"image_id": [f"j{k}" for k in range(50)], "checkpoint": "ck", "metric": m,
                                       "layer": None, "value": v.astype(float)})
                         for m, v in (("l2", narrow), ("recon", narrow * np.float32(3.7) + np.float32(0.1)))])
    assert same_tests(rounded, [f"j{k}" for k in range(50)]).same_as("ck", "recon", None) == "l2"


def test_partial_does_not_test_a_metric_that_is_one_of_its_covariates(tmp_path: Path) -> None:
    """Before: luminance partialled on luminance gave r −0.021, p 0.75 from round-off and entered the family."""
    rng = np.random.default_rng(3)
    ids = [f"i{k:02d}" for k in range(N)]
    lum, contrast, other = rng.uniform(0.2, 0.8, N), rng.uniform(0.1, 0.3, N), rng.normal(size=N)
    metrics = pd.concat([pd.DataFrame({"image_id": ids, "checkpoint": "ck", "metric": m, "layer": None, "value": v})
                         for m, v in (("luminance", lum), ("rms-contrast", contrast), ("mix", lum - 3 * contrast),
                                      ("other", other))], ignore_index=True)
    ratings = pd.DataFrame({"image_id": ids, "beauty": lum + other + rng.normal(size=N), "age": 2 * other + 1})
    for method in ("pearson", "spearman"):
        out = Partial(covariates=["luminance", "rms-contrast"], method=method).run(
            AnalysisData(metrics, ratings, "beauty")).set_index("metric")
        for metric in ("luminance", "rms-contrast") + (("mix",) if method == "pearson" else ()):
            assert np.isnan(out.loc[metric, "estimate"]) and np.isnan(out.loc[metric, "p"]), (method, metric)
            assert out.loc[metric, "note"] == COVARIATE_NOTE
        assert np.isfinite(out.loc["other", "p"]) and out.loc["other", "note"] == ""
    # a ratings column that is an affine map of the metric covers it too; the textbook value for the others
    out = Partial(covariates=["age"]).run(AnalysisData(metrics, ratings, "beauty")).set_index("metric")
    assert out.loc["other", "note"] == COVARIATE_NOTE
    y = ratings["beauty"].to_numpy()
    rxy, rxz, ryz = (stats.pearsonr(u, v).statistic for u, v in ((lum, y), (lum, other), (y, other)))
    assert out.loc["luminance", "estimate"] == pytest.approx((rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2)),
                                                             abs=1e-10)
    # in a run, the untested rows leave the BH family
    results = run_analyses(metrics, ratings, tmp_path / "run", extra=["partial"],
                           settings={"partial": {"covariates": ["luminance", "rms-contrast"]}})
    partial = results["partial"].set_index("metric")
    assert partial.loc[["luminance", "rms-contrast", "mix"], "p_fdr"].isna().all()
    every, oracle = bh_over_tested(results)
    assert np.allclose(every["p_fdr"], oracle, rtol=1e-12, atol=0, equal_nan=True)
