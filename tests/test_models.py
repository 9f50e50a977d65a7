"""Ridge (cross-validated R², permutation p) and OLS (statsmodels) analyses."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from fluency.core.plugin.analysis import AnalysisData
from fluency.plugins.default_ols import OLS
from fluency.plugins.default_ridge import Ridge


def planted(n: int = 120, signal: float = 1.0, seed: int = 0) -> tuple[AnalysisData, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(n)]
    layers = {f"enc{j}": rng.normal(size=n) for j in range(1, 4)}
    rating = signal * (layers["enc1"] - 0.5 * layers["enc2"]) + rng.normal(size=n)
    rows = [pd.DataFrame({"image_id": ids, "checkpoint": "ck", "metric": "gini", "layer": name, "value": v})
            for name, v in layers.items()]
    ratings = pd.DataFrame({"image_id": ids, "beauty": rating, "age": rng.normal(size=n),
                            "sex": rng.choice(["f", "m"], n)})
    return AnalysisData(pd.concat(rows, ignore_index=True), ratings, "beauty"), rating


def test_ridge_recovers_a_planted_linear_relation() -> None:
    data, rating = planted(n=300, signal=1.0)
    row = Ridge(folds=5, repeats=3, permutations=30, seed=0).run(data).iloc[0]
    m = data.metrics.pivot(index="image_id", columns="layer", values="value").loc[data.ratings["image_id"]]
    noise = rating - (m["enc1"] - 0.5 * m["enc2"]).to_numpy()
    true_r2 = 1 - noise.var() / rating.var()  # what the true model explains in this sample
    assert row["n_features"] == 3 and row["layers"] == "enc1,enc2,enc3"
    assert abs(row["estimate"] - true_r2) < 0.05
    assert row["p"] == pytest.approx(1 / 31)  # no permutation reaches the observed R²
    assert row["r2_fold_sd"] > 0 and abs(row["r2_fold_mean"] - row["estimate"]) < 0.1


def test_ridge_on_pure_noise_is_near_or_below_zero_and_not_significant() -> None:
    data, _ = planted(signal=0.0, seed=1)
    row = Ridge(folds=5, repeats=3, permutations=40, seed=0).run(data).iloc[0]
    assert row["estimate"] < 0.05 and row["p"] > 0.05


def test_ridge_is_seeded() -> None:
    data, _ = planted()
    a = Ridge(repeats=2, permutations=5, seed=3).run(data)
    b = Ridge(repeats=2, permutations=5, seed=3).run(data)
    assert a["estimate"].equals(b["estimate"]) and a["p"].equals(b["p"])


def test_permutation_null_fitted_at_once_equals_one_fit_per_shuffle() -> None:
    """The multi-target RidgeCV (penalty per column) gives what fitting every shuffle on its own gives."""
    from fluency.plugins.default_ridge import cross_validated_r2, permutation_null

    data, rating = planted(n=60, signal=0.5, seed=2)
    x = data.metrics.pivot(index="image_id", columns="layer", values="value").loc[data.ratings["image_id"]].to_numpy()
    alphas = np.logspace(-3, 4, 30)
    null = permutation_null(x, rating, 25, 5, 7, alphas)
    rng = np.random.default_rng(7)
    one_by_one = [cross_validated_r2(x, rng.permutation(rating), 5, 1, 7, alphas)[0] for _ in range(25)]
    assert null.shape == (25,) and np.allclose(null, one_by_one, rtol=0, atol=1e-10)
    assert len(set(np.round(null, 12))) > 20  # the shuffles really differ


def test_ols_matches_statsmodels_with_covariates_and_groups() -> None:
    data, rating = planted()
    out = OLS(covariates=["age"], groups=["sex"]).run(data)
    row = out[out.layer == "enc1"].iloc[0]
    x = data.metrics[data.metrics.layer == "enc1"]["value"].to_numpy()
    design = pd.DataFrame({"value": x, "age": data.ratings["age"], "m": (data.ratings["sex"] == "m").astype(float)})
    fit = sm.OLS(rating, sm.add_constant(design)).fit()
    assert row["estimate"] == pytest.approx(fit.params["value"]) and row["se"] == pytest.approx(fit.bse["value"])
    assert row["p"] == pytest.approx(fit.pvalues["value"]) and row["r2_adj"] == pytest.approx(fit.rsquared_adj)
    assert "q_age" in json.loads(row["coefficients"])
    from fluency.core.errors import FluencyError

    with pytest.raises(FluencyError, match="not columns"):
        OLS(covariates=["height"]).run(data)


def noise_layers(n: int = 30, layers: int = 40, seed: int = 5) -> tuple[AnalysisData, np.ndarray, np.ndarray]:
    """A metric on ``layers`` layers of pure noise and a rating unrelated to it: more features than images."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k:03d}" for k in range(n)]  # sorted as the analysis sorts them: the same K-fold splits
    x = rng.normal(size=(n, layers))
    rows = [pd.DataFrame({"image_id": ids, "checkpoint": "ck", "metric": "gini", "layer": f"l{j:02d}",
                          "value": x[:, j]}) for j in range(layers)]
    y = rng.normal(size=n)
    return AnalysisData(pd.concat(rows, ignore_index=True), pd.DataFrame({"image_id": ids, "beauty": y}), "beauty"), x, y


def test_ridge_fits_estimate_and_null_inside_the_folds() -> None:
    """40 noise layers, 30 images, a nearly unpenalised ridge: fitted on all the data it interpolates the ratings
    (in-sample R² ≈ 1, for the observed and every shuffled rating alike); fitted inside the folds, as it must
    be, it predicts held-out images worse than their mean (R² < 0), and so does every shuffle."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fluency.plugins.default_ridge import cross_validated_r2, permutation_null

    data, x, y = noise_layers()
    opts = {"folds": 5, "repeats": 2, "permutations": 20, "seed": 0, "alpha_min_log10": -3.0, "alpha_max_log10": -1.0}
    row = Ridge(**opts).run(data).iloc[0]
    assert row["n_features"] == 40 and row["n"] == 30
    assert row["estimate"] < -0.2 and row["r2_fold_mean"] < 0 and row["p"] > 0.3
    alphas = np.logspace(-3, -1, 30)
    in_sample = r2_score(y, make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(x, y).predict(x))
    assert in_sample > 0.99  # what a fit on all the data would report
    null = permutation_null(x, y, 20, 5, 0, alphas)
    assert null.max() < 0.5 and np.median(null) < -0.2  # a leaked fit: every shuffle ≈ 1
    # the independent oracle: scikit-learn's own out-of-fold predictions over the same seeded K-fold splits
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
    oracle = np.mean([r2_score(y, cross_val_predict(model, x, y, cv=KFold(5, shuffle=True, random_state=r)))
                      for r in range(2)])
    assert row["estimate"] == pytest.approx(oracle, abs=1e-10)
    assert cross_validated_r2(x, y, 5, 2, 0, alphas)[0] == pytest.approx(oracle, abs=1e-10)
    rng = np.random.default_rng(0)
    shuffles = [rng.permutation(y) for _ in range(20)]
    null_oracle = [r2_score(s, cross_val_predict(model, x, s, cv=KFold(5, shuffle=True, random_state=0)))
                   for s in shuffles]
    assert np.allclose(null, null_oracle, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n, layers", [(90, 4), (30, 40)])  # more features than training rows in the second
def test_delta_r2_null_equals_one_scikit_learn_pipeline_per_shuffle(n: int, layers: int) -> None:
    """The batched ridge of the ΔR² null gives what scikit-learn's StandardScaler + RidgeCV gives fitted on every
    shuffle's features fold by fold (a constant covariate included: scikit-learn leaves it unscaled)."""
    from sklearn.metrics import r2_score
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fluency.plugins.default_ridge import delta_r2_null

    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, layers))
    y = x[:, 0] + rng.normal(size=n)
    z = np.column_stack([0.5 * y + rng.normal(size=n), rng.normal(size=n), np.full(n, 3.0)])
    alphas = np.logspace(-3, 4, 30)
    null = delta_r2_null(z, x, y, 12, 5, 4, alphas, chunk=5)
    splits = list(KFold(5, shuffle=True, random_state=4).split(z))

    def pooled(features: np.ndarray) -> float:
        pred = np.empty_like(y)
        for train, test in splits:
            pred[test] = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(features[train], y[train]).predict(features[test])
        return r2_score(y, pred)

    order = np.random.default_rng(5)
    oracle = [pooled(np.column_stack([z, x[order.permutation(n)]])) - pooled(z) for _ in range(12)]
    assert null.shape == (12,) and np.allclose(null, oracle, rtol=0, atol=1e-9)
    assert len(set(np.round(null, 9))) == 12
