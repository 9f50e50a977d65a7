"""Known answers for the MI estimators: correlated Gaussians, independence, and sklearn's KSG as an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.feature_selection import mutual_info_regression

from fluency_mutual_info.estimators import (bootstrap_mean_ci, gaussian_local_mi, gaussian_mi, ksg_local_mi,
                                            projection_matrix, reduce)


def correlated(n: int, d: int, rho: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """d independent pairs (x_i, y_i) with correlation rho: I = −(d/2)·log2(1 − rho²) bits."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, rho * x + math.sqrt(1 - rho**2) * rng.standard_normal((n, d))


def true_mi(d: int, rho: float) -> float:
    return -(d / 2) * math.log2(1 - rho**2)


# Tolerances: the sampling SD of the estimate is about rho·sqrt(d/N) nats (≈1% here); over 20 seeds the
# largest relative errors were 1.7% (Gaussian, N=20000) and 3.3% (KSG, N=10000).
@pytest.mark.parametrize("d", [1, 2])
def test_gaussian_estimator_known_mi(d: int) -> None:
    x, y = correlated(20000, d, 0.9)
    assert gaussian_local_mi(x, y).mean() == pytest.approx(true_mi(d, 0.9), rel=0.03)


@pytest.mark.parametrize("d", [1, 2])
def test_ksg_known_mi(d: int) -> None:
    x, y = correlated(10000, d, 0.9)
    assert ksg_local_mi(x, y, k=3).mean() == pytest.approx(true_mi(d, 0.9), rel=0.06)


def test_mean_of_local_gaussian_mi_is_the_gaussian_mi() -> None:
    x, y = correlated(300, 3, 0.5, seed=1)
    y = y @ np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 1.0]])  # correlated dimensions too
    assert gaussian_local_mi(x, y).mean() == pytest.approx(gaussian_mi(x, y), abs=1e-10)


@pytest.mark.parametrize("estimate", [lambda x, y: gaussian_local_mi(x, y).mean(),
                                      lambda x, y: ksg_local_mi(x, y, 3).mean()])
def test_independent_is_zero(estimate) -> None:
    x, y = correlated(5000, 2, 0.0, seed=2)
    assert abs(estimate(x, y)) < 0.05


@pytest.mark.parametrize("rho,seed", [(0.5, 0), (0.8, 1), (0.95, 2)])
def test_ksg_matches_sklearn(rho: float, seed: int) -> None:
    """sklearn's mutual_info_regression is KSG estimator 1 in nats (on unit-variance data, plus 1e-10 noise)."""
    x, y = correlated(2000, 1, rho, seed)
    x, y = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
    theirs = mutual_info_regression(x, y[:, 0], n_neighbors=4, random_state=0)[0] / math.log(2)
    assert ksg_local_mi(x, y, k=4).mean() == pytest.approx(theirs, abs=1e-6)


def test_mi_is_invariant_to_invertible_linear_maps() -> None:
    x, y = correlated(500, 2, 0.7, seed=3)
    a = np.array([[2.0, 1.0], [0.0, 0.5]])
    assert gaussian_mi(x @ a, y * 3 - 1) == pytest.approx(gaussian_mi(x, y), abs=1e-9)


def test_reduce_drops_null_components_and_standardises() -> None:
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 20))  # rank 3 in 20 dimensions
    z = reduce(rows, 8)
    assert z.shape == (50, 3)
    np.testing.assert_allclose(z.std(0, ddof=1), 1.0)
    assert reduce(np.ones((10, 5)), 4).shape == (10, 0)
    assert np.all(gaussian_local_mi(z, reduce(np.ones((50, 5)), 4)) == 0)


def test_gaussian_refuses_a_singular_joint() -> None:
    x, _ = correlated(100, 2, 0.0)
    with pytest.raises(ValueError, match="singular"):
        gaussian_local_mi(x, x @ np.array([[1.0, 2.0], [3.0, 4.0]]))


def test_projection_is_fixed_by_its_key() -> None:
    a, b = projection_matrix(100, 8, 7), projection_matrix(100, 8, 7)
    assert a.shape == (100, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, projection_matrix(100, 8, 8))


def test_bootstrap_interval_of_the_mean() -> None:
    values = np.random.default_rng(5).normal(2.0, 1.0, 400)
    low, high = bootstrap_mean_ci(values, 2000, 0.95, seed=0)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std() / math.sqrt(400), rel=0.15)
    assert bootstrap_mean_ci(values, 2000, 0.95, seed=0) == (low, high)
    assert all(math.isnan(v) for v in bootstrap_mean_ci(values, 0, 0.95, seed=0))
