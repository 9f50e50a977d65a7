"""Pearson, Spearman and the run-wide Benjamini–Hochberg correction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from fluency.core.plugin.analysis import RESULT_COLUMNS, AnalysisData
from fluency.core.stats import fdr_bh
from fluency.plugins.default_correlation import Pearson, Spearman

X = [1, 2, 3, 4, 5]
Y = [2, 4, 5, 4, 5]


def data(values, ratings, metric="gini", layer="enc1") -> AnalysisData:
    ids = [f"img{i}" for i in range(len(values))]
    metrics = pd.DataFrame({"image_id": ids, "checkpoint": "ck", "metric": metric, "layer": layer,
                            "value": np.asarray(values, float)})
    return AnalysisData(metrics, pd.DataFrame({"image_id": ids, "beauty": ratings}), "beauty")


def test_reference_known_answers() -> None:
    p = Pearson().run(data(X, Y)).iloc[0]
    s = Spearman().run(data(X, Y)).iloc[0]
    assert p["estimate"] == pytest.approx(0.7745966692, abs=1e-9) and p["p"] == pytest.approx(0.1240270627, abs=1e-9)
    assert s["estimate"] == pytest.approx(0.7378647874, abs=1e-9) and s["p"] == pytest.approx(0.1546185231, abs=1e-9)
    assert (p["statistic"], s["statistic"], p["n"]) == ("r", "rho", 5)
    assert list(Pearson().run(data(X, Y)).columns[: len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)


def test_groups_by_checkpoint_metric_layer_and_keeps_null_layers() -> None:
    rng = np.random.default_rng(1)
    frames = []
    for metric, layer in [("gini", "enc1"), ("gini", "enc2"), ("sam", None)]:
        d = data(rng.normal(size=30), rng.normal(size=30), metric, layer)
        frames.append(d.metrics)
    ratings = d.ratings
    out = Pearson().run(AnalysisData(pd.concat(frames), ratings, "beauty"))
    assert len(out) == 3 and out["layer"].isna().sum() == 1
    for row in out.itertuples():
        sub = pd.concat(frames)
        same_layer = sub.layer.isna() if pd.isna(row.layer) else sub.layer == row.layer
        sub = sub[(sub.metric == row.metric) & same_layer]
        r, p = stats.pearsonr(sub["value"], ratings.set_index("image_id").loc[sub["image_id"], "beauty"])
        assert row.estimate == pytest.approx(r) and row.p == pytest.approx(p)


def test_constant_and_tiny_inputs_are_reported_not_crashing() -> None:
    out = Pearson().run(data([1, 1, 1, 1], [1, 2, 3, 4]))
    assert np.isnan(out["estimate"].iloc[0]) and out["note"].iloc[0] == "constant values"
    out = Spearman().run(data([1, 2], [1, 2]))
    assert np.isnan(out["p"].iloc[0]) and "fewer than" in out["note"].iloc[0]


def test_bh_known_answer_and_statsmodels() -> None:
    assert np.allclose(fdr_bh([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    p = np.random.default_rng(0).uniform(size=50) ** 3
    assert np.allclose(fdr_bh(p), multipletests(p, method="fdr_bh")[1])
    with_nan = fdr_bh([0.01, np.nan, 0.04])
    assert np.isnan(with_nan[1]) and np.allclose(with_nan[[0, 2]], [0.02, 0.04])


def test_bootstrap_interval_is_seeded_and_covers_the_estimate() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=80)
    y = 0.5 * x + rng.normal(size=80)
    a = Pearson(n_boot=500, ci=0.95, seed=1).run(data(x, y)).iloc[0]
    b = Pearson(n_boot=500, ci=0.95, seed=1).run(data(x, y)).iloc[0]
    assert a["ci_low"] == b["ci_low"] and a["ci_low"] < a["estimate"] < a["ci_high"]
    ref = stats.bootstrap((x, y), lambda u, v: stats.pearsonr(u, v).statistic, paired=True, n_resamples=2000,
                          method="percentile", random_state=0).confidence_interval
    assert abs(a["ci_low"] - ref.low) < 0.06 and abs(a["ci_high"] - ref.high) < 0.06
    s = Spearman(n_boot=300, seed=1).run(data(x, y)).iloc[0]
    assert s["ci_low"] < s["estimate"] < s["ci_high"]


def test_partial_correlation_matches_the_textbook_formula() -> None:
    from fluency.plugins.default_correlation import Partial

    rng = np.random.default_rng(4)
    z = rng.normal(size=60)
    x = z + rng.normal(size=60)
    y = z + 0.3 * x + rng.normal(size=60)
    d = data(x, y)
    d.ratings["age"] = z
    row = Partial(covariates=["age"]).run(d).iloc[0]
    rxy, rxz, ryz = (stats.pearsonr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    expected = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    assert row["estimate"] == pytest.approx(expected, abs=1e-10)
    t = expected * np.sqrt((60 - 3) / (1 - expected**2))
    assert row["p"] == pytest.approx(2 * stats.t.sf(abs(t), 57), rel=1e-8)
    from fluency.core.errors import FluencyError

    with pytest.raises(FluencyError, match="covariates"):
        Partial()
