"""Pearson, Spearman and the run-wide Benjamini–Hochberg correction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from fluency.core.analysis import RESULT_COLUMNS, AnalysisData
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
