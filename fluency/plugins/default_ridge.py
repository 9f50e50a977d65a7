"""Analysis ``ridge``: how well a metric's per-layer values predict the ratings, cross-validated.

The study's "linear models": for each (checkpoint, metric), the features are the metric's values
on every layer (one column per layer; whole-model metrics give one column), standardised inside
each training fold, and a ridge regression whose penalty is chosen inside the fold
(``RidgeCV`` over ``alphas``, efficient leave-one-out) predicts the rating. Repeated K-fold
(``folds`` × ``repeats`` seeded shuffles, scikit-learn) gives:

- ``estimate`` = ``r2_pooled``: R² of the pooled out-of-fold predictions, averaged over repeats;
- ``r2_fold_mean`` ± ``r2_fold_sd``: mean and SD of the per-fold R² (they differ from the pooled
  R²; both are reported, and both can be negative: worse than predicting the mean);
- ``p``: permutation p-value of ``r2_pooled`` — (1 + #{permuted ≥ observed}) / (1 + permutations),
  the ratings shuffled ``permutations`` times (seeded) through the same pipeline;
- ``r2_in_sample``, ``r2_adj_in_sample``: the literature's in-sample R² and adjusted R²
  (1 − (1 − R²)(n − 1)/(n − k − 1), k features) of the ordinary least-squares fit of the rating on the
  same features, on all images — what published, in-sample figures report (no penalty, no hold-out),
  so they can be set beside them; NaN when n ≤ k + 1.

With the run's covariates (:attr:`fluency.AnalysisData.covariates`), also the R² the metric adds over
them, on the same folds: ``r2_covariates`` = cross-validated R² of the covariates alone,
``estimate_adj`` = ΔR² = R²(covariates + metric) − R²(covariates), both averaged over the repeats,
and ``p_adj``, its permutation p: the metric's rows are shuffled relative to the covariates and the
rating (whose own relation is kept) ``permutations`` times, ΔR² recomputed on the first repeat's split.
Scaler, penalty and coefficients are fitted inside each training fold, for the estimate and every
permutation alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fluency import Analysis, AnalysisData, AnalysisSpec, Option, hookimpl
from fluency.api import ADJUSTED_COLUMNS, RESULT_COLUMNS, EffectSize


def _pipeline(alphas: np.ndarray, per_target: bool = False) -> Any:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=alphas, alpha_per_target=per_target))


def cross_validated_r2(x: np.ndarray, y: np.ndarray, folds: int, repeats: int, seed: int,
                       alphas: np.ndarray) -> tuple[float, list[float]]:
    """(mean over repeats of the pooled out-of-fold R², per-fold R² values) for repeated K-fold."""
    from sklearn.base import clone
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold

    model = _pipeline(alphas)
    pooled, per_fold = [], []
    for r in range(repeats):
        pred = np.empty_like(y)
        for train, test in KFold(folds, shuffle=True, random_state=seed + r).split(x):
            fitted = clone(model).fit(x[train], y[train])
            pred[test] = fitted.predict(x[test])
            per_fold.append(r2_score(y[test], pred[test]) if len(test) > 1 else np.nan)
        pooled.append(r2_score(y, pred))
    return float(np.mean(pooled)), per_fold


def permutation_null(x: np.ndarray, y: np.ndarray, permutations: int, folds: int, seed: int,
                     alphas: np.ndarray) -> np.ndarray:
    """Pooled out-of-fold R² of ``permutations`` seeded shuffles of ``y``, each through the same pipeline and
    the same K-fold split (that of the first repeat), penalty chosen per shuffle.

    All shuffles are fitted at once as the columns of one multi-target ``RidgeCV`` with
    ``alpha_per_target=True``: its leave-one-out choice of the penalty is made for each column on its
    own, so this equals fitting every shuffle separately (tested) at the cost of one fit per fold.
    """
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(seed)
    shuffled = np.column_stack([rng.permutation(y) for _ in range(permutations)])
    pred = np.empty_like(shuffled)
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
        pred[test] = _pipeline(alphas, per_target=True).fit(x[train], shuffled[train]).predict(x[test])
    return np.asarray(r2_score(shuffled, pred, multioutput="raw_values"))


def in_sample_r2(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(R², adjusted R²) of the least-squares fit of y on x with an intercept, on the same data; adjusted R² is
    1 − (1 − R²)(n − 1)/(n − k − 1) for k columns of x (NaN, both, when n ≤ k + 1: a saturated fit)."""
    n, k = x.shape
    if n <= k + 1:
        return np.nan, np.nan
    design = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    r2 = 1 - float(((y - design @ coef) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    return r2, 1 - (1 - r2) * (n - 1) / (n - k - 1)


def delta_r2_null(z: np.ndarray, x: np.ndarray, y: np.ndarray, permutations: int, folds: int, seed: int,
                  alphas: np.ndarray, chunk: int = 50) -> np.ndarray:
    """ΔR² = pooled R²(z + x) − pooled R²(z) of ``permutations`` seeded shuffles of the rows of ``x`` alone (the
    covariates ``z`` stay with the rating ``y``), each through the same pipeline on the K-fold split of the first
    repeat (penalty chosen inside each training fold).

    Every shuffle has its own features, so none can share a fit; :func:`ridge_predict` fits ``chunk`` of them
    at once per fold (one batched SVD each), ~10× faster than one scikit-learn pipeline per shuffle and
    equal to it (tested against scikit-learn)."""
    from sklearn.model_selection import KFold

    splits = list(KFold(folds, shuffle=True, random_state=seed).split(z))

    def pooled(features: np.ndarray) -> np.ndarray:
        """Pooled out-of-fold R² of each feature set of ``features`` (P, n, d)."""
        pred = np.empty(features.shape[:2])
        for train, test in splits:
            pred[:, test] = ridge_predict(features[:, train], y[train], features[:, test], alphas)
        return 1 - ((y - pred) ** 2).sum(axis=1) / ((y - y.mean()) ** 2).sum()

    base = pooled(z[None])[0]
    rng = np.random.default_rng(seed + 1)
    orders = [rng.permutation(len(y)) for _ in range(permutations)]
    null = [pooled(np.concatenate([np.broadcast_to(z, (len(part), *z.shape)), x[np.array(part)]], axis=2))
            for part in (orders[i:i + chunk] for i in range(0, permutations, chunk))]
    return np.concatenate(null) - base if null else np.array([])


def ridge_predict(train: np.ndarray, y: np.ndarray, test: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Predictions (P, t) of the pipeline of :func:`_pipeline` fitted on each of P feature sets at once:
    ``train`` (P, m, d) with ratings ``y`` (m,), ``test`` (P, t, d).

    As scikit-learn does it: each column standardised with the training rows' mean and (population) SD, a
    constant column left unscaled; the penalty chosen among ``alphas`` by the smallest mean squared
    leave-one-out error of a ridge with an unpenalised intercept (the first on a tie), then the ridge refitted
    with that penalty. With the eigenvectors V and eigenvalues λ of XᵀX (X the centred features, Q = XV), the
    leave-one-out residual is e_i / (1 − h_ii), h_ii = 1/m + Σ_j Q_ij² / (λ_j + α), and the coefficients are
    V (Qᵀy / (λ + α)). A batched eigendecomposition of the d×d Gram matrices, not an SVD of the m×d
    features: numpy's batched SVD was ~100× slower here.
    """
    m = train.shape[1]
    mean = train.mean(axis=1, keepdims=True)
    scale = train.std(axis=1, keepdims=True)
    scale[scale <= 10 * np.finfo(float).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    features = (train - mean) / scale
    eigenvalues, v = np.linalg.eigh(features.transpose(0, 2, 1) @ features)
    eigenvalues = np.clip(eigenvalues, 0.0, None)[..., None]  # (P, d, 1); rounding can make a zero negative
    q = features @ v
    centred = y - y.mean()
    qty = (centred @ q)[..., None]  # (P, d, 1)
    inverse = 1 / (eigenvalues + alphas)  # (P, d, alphas)
    residual = centred[:, None] - q @ (inverse * qty)
    leverage = 1 / m + q ** 2 @ inverse
    best = ((residual / (1 - leverage)) ** 2).mean(axis=1).argmin(axis=1)  # the first of equal errors
    coef = (v @ (inverse[np.arange(len(best)), :, best][..., None] * qty))[..., 0]
    return y.mean() + (((test - mean) / scale) @ coef[..., None])[..., 0]


class Ridge(Analysis):
    def run(self, data: AnalysisData) -> pd.DataFrame:
        o = self.options
        folds, repeats, seed = int(o.get("folds", 5)), int(o.get("repeats", 10)), int(o.get("seed", 0))
        n_perm = int(o.get("permutations", 200))
        alphas = np.logspace(float(o.get("alpha_min_log10", -3)), float(o.get("alpha_max_log10", 4)), 30)
        covariates = data.covariate_names
        rows = []
        for checkpoint, metric in data.groups("checkpoint", "metric"):
            group = data.rows(checkpoint=checkpoint, metric=metric)
            group["layer"] = group["layer"].fillna("(whole)")
            wide = group.pivot_table(index="image_id", columns="layer", values="value", aggfunc="first")
            ratings = group.drop_duplicates("image_id").set_index("image_id")["rating"].reindex(wide.index)
            ok = np.isfinite(wide.to_numpy()).all(axis=1) & np.isfinite(ratings.to_numpy())
            z = data.covariate_matrix(checkpoint, wide.index) if covariates else None
            if z is not None:
                ok &= np.isfinite(z).all(axis=1)
                z = z[ok]
            x, y = wide.to_numpy(float)[ok], ratings.to_numpy(float)[ok]
            row: dict[str, Any] = {"analysis": "ridge", "checkpoint": checkpoint, "metric": metric, "layer": None,
                                   "n": len(y), "statistic": "r2_pooled", "estimate": np.nan, "p": np.nan,
                                   "r2_fold_mean": np.nan, "r2_fold_sd": np.nan, "n_features": x.shape[1],
                                   "layers": ",".join(map(str, wide.columns)), "note": "",
                                   "r2_in_sample": np.nan, "r2_adj_in_sample": np.nan}
            if covariates:
                row.update(r2_covariates=np.nan, estimate_adj=np.nan, p_adj=np.nan, covariates=",".join(covariates))
            if len(y) < 2 * folds or np.ptp(y) == 0:
                row["note"] = f"fewer than {2 * folds} images or constant ratings"
                rows.append(row)
                continue
            r2, per_fold = cross_validated_r2(x, y, folds, repeats, seed, alphas)
            null = permutation_null(x, y, n_perm, folds, seed, alphas) if n_perm else np.array([])
            row.update(estimate=r2, r2_fold_mean=float(np.nanmean(per_fold)), r2_fold_sd=float(np.nanstd(per_fold)),
                       p=(1 + int((null >= r2).sum())) / (1 + n_perm) if n_perm else np.nan)
            row["r2_in_sample"], row["r2_adj_in_sample"] = in_sample_r2(x, y)
            if z is not None and metric not in covariates:
                r2_z, _ = cross_validated_r2(z, y, folds, repeats, seed, alphas)
                r2_zx, _ = cross_validated_r2(np.column_stack([z, x]), y, folds, repeats, seed, alphas)
                delta = r2_zx - r2_z
                null = delta_r2_null(z, x, y, n_perm, folds, seed, alphas) if n_perm else np.array([])
                row.update(r2_covariates=r2_z, estimate_adj=delta,
                           p_adj=(1 + int((null >= delta).sum())) / (1 + n_perm) if n_perm else np.nan)
            rows.append(row)
        extra = ("r2_covariates", *ADJUSTED_COLUMNS) if covariates else ()
        return pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "r2_fold_mean", "r2_fold_sd", "n_features", "layers",
                                           "note", "r2_in_sample", "r2_adj_in_sample", *extra])


@hookimpl
def fluency_register_analyses() -> list[AnalysisSpec]:
    return [AnalysisSpec(
        name="ridge", factory=Ridge,
        effects=(EffectSize("r2_pooled", "CV R²", kind="r2", range=None, directional=False,
                            heatmap=False),),
        description="Cross-validated R² of the ratings from a metric's per-layer values (ridge, permutation p); "
                    "ΔR² over the run's covariates; in-sample R² and adjusted R² (OLS) beside published figures.",
        options={"folds": Option("int", 5, "K of the K-fold cross-validation", minimum=2),
                 "repeats": Option("int", 10, "seeded reshuffles of the K-fold split", minimum=1),
                 "permutations": Option("int", 200, "label permutations for the p-value (0: none)", minimum=0),
                 "seed": Option("int", 0, "seed of the splits and permutations"),
                 "alpha_min_log10": Option("float", -3.0, "smallest ridge penalty, log10"),
                 "alpha_max_log10": Option("float", 4.0, "largest ridge penalty, log10")})]
