"""Estimators behind the plugins, in plain numpy/scipy/scikit-learn (no torch, no fluency).

All information quantities are in bits. ``x`` and ``y`` are N×d arrays whose rows are paired
samples (row j of ``x`` goes with row j of ``y``).

- :func:`gaussian_local_mi`: i_j = log p(x_j, y_j) − log p(x_j) − log p(y_j) under Gaussians with the
  maximum-likelihood (empirical, ddof = 0) mean and covariance, so mean_j i_j equals the Gaussian
  MI ½ log(det Σx · det Σy / det Σxy) of those covariances exactly (:func:`gaussian_mi`).
- :func:`ksg_local_mi`: the local terms of Kraskov, Stögbauer & Grassberger's estimator 1
  (Phys. Rev. E 69, 066138, 2004), max-norm, whose mean is the KSG estimate.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy.special import digamma

LN2 = math.log(2.0)
#: PCA components whose variance is below this fraction of the largest are treated as null (rank deficiency)
NULL_VARIANCE = 1e-9


def seed_key(seed: int, name: str) -> int:
    """A 63-bit generator key from the run seed and a name (crc32: stable across processes)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (1 << 63)


def projection_matrix(n_features: int, dims: int, key: int) -> np.ndarray:
    """A fixed Gaussian random projection, n_features × dims float32, entries N(0, 1/dims), drawn from ``key``."""
    rng = np.random.default_rng(key)
    return (rng.standard_normal((n_features, dims), dtype=np.float32) / np.float32(math.sqrt(dims)))


def reduce(rows: np.ndarray, dims: int) -> np.ndarray:
    """The first ``dims`` principal components of ``rows`` (N×p), each scaled to unit variance.

    At most min(dims, N − 1, p) components; components with (numerically) zero variance are
    dropped, so a constant input gives N×0. Scaling is invertible per component, so it changes no
    mutual information; it puts every component on the same footing for the max-norm of KSG.
    """
    from sklearn.decomposition import PCA

    rows = np.asarray(rows, dtype=np.float64)
    n, p = rows.shape
    k = min(dims, n - 1, p)
    if k < 1 or not np.ptp(rows, axis=0).any():  # nothing varies: no components
        return np.zeros((n, 0))
    pca = PCA(n_components=k, svd_solver="full").fit(rows)
    var = pca.explained_variance_
    keep = var > NULL_VARIANCE * var.max() if var.max() > 0 else np.zeros(k, dtype=bool)
    return pca.transform(rows)[:, keep] / np.sqrt(var[keep])


def _log_density(z: np.ndarray) -> np.ndarray:
    """Log-density (nats) of each row of ``z`` under the Gaussian with its empirical mean and covariance."""
    from sklearn.covariance import EmpiricalCovariance

    fit = EmpiricalCovariance(assume_centered=False).fit(z)
    sign, logdet = np.linalg.slogdet(fit.covariance_)
    if sign <= 0:
        raise ValueError("singular covariance: the samples span fewer dimensions than they have "
                         "(one block is an exact linear function of the other, or too few samples)")
    d = z.shape[1]
    return -0.5 * (d * math.log(2 * math.pi) + logdet + fit.mahalanobis(z))


def gaussian_local_mi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Local (pointwise) Gaussian MI in bits: log p(x_j, y_j) − log p(x_j) − log p(y_j) per row.

    The Gaussians use sklearn's :class:`~sklearn.covariance.EmpiricalCovariance` (maximum
    likelihood); their mean over rows equals :func:`gaussian_mi`. Zero everywhere if ``x`` or
    ``y`` has no columns. Raises ``ValueError`` if a covariance is singular (infinite MI).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape[1] == 0 or y.shape[1] == 0:
        return np.zeros(len(x))
    joint = _log_density(np.hstack([x, y]))
    return (joint - _log_density(x) - _log_density(y)) / LN2


def gaussian_mi(x: np.ndarray, y: np.ndarray) -> float:
    """Gaussian MI in bits from the empirical (ddof = 0) covariances: ½ log2(det Σx det Σy / det Σxy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = x.shape[1]
    cov = np.atleast_2d(np.cov(np.hstack([x, y]), rowvar=False, ddof=0))
    logdet = [np.linalg.slogdet(c)[1] for c in (cov[:dx, :dx], cov[dx:, dx:], cov)]
    return 0.5 * (logdet[0] + logdet[1] - logdet[2]) / LN2


def ksg_local_mi(x: np.ndarray, y: np.ndarray, k: int = 3) -> np.ndarray:
    """Local terms of the KSG estimator 1 in bits: (ψ(k) + ψ(N) − ψ(n_x,j + 1) − ψ(n_y,j + 1)) / ln 2.

    ε_j is the max-norm distance from (x_j, y_j) to its k-th nearest neighbour in the joint space;
    n_x,j counts the other rows with ‖x_i − x_j‖∞ < ε_j (strictly), n_y,j likewise. Their mean is
    the KSG estimate (as in sklearn's ``mutual_info_regression``, which does the same in 1-D and
    clips the mean at 0; these local terms are not clipped). Rows must be distinct (ties at
    distance 0 make ε_j = 0).
    """
    from sklearn.neighbors import KDTree, NearestNeighbors

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n <= k:
        raise ValueError(f"KSG with k={k} needs more than {k} samples, got {n}")
    if x.shape[1] == 0 or y.shape[1] == 0:
        return np.zeros(n)
    joint = np.hstack([x, y])
    radius = NearestNeighbors(n_neighbors=k, metric="chebyshev").fit(joint).kneighbors()[0][:, -1]
    radius = np.nextafter(radius, 0)  # query_radius counts distance ≤ r: this makes it < ε
    nx = KDTree(x, metric="chebyshev").query_radius(x, radius, count_only=True) - 1
    ny = KDTree(y, metric="chebyshev").query_radius(y, radius, count_only=True) - 1
    return (digamma(k) + digamma(n) - digamma(nx + 1) - digamma(ny + 1)) / LN2


def bootstrap_mean_ci(values: np.ndarray, n_boot: int, level: float, seed: int,
                      chunk: int = 256) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling them with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if n_boot == 0 or len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, len(values), size=(min(chunk, n_boot - s), len(values)))].mean(1)
                            for s in range(0, n_boot, chunk)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
