"""Statistics shared by every analysis: multiple-testing correction across a run, and the test of the
difference between two dependent correlations (one metric under two checkpoints against the same rating)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

#: methods of :func:`dependent_correlation_test`
DEPENDENT_METHODS = ("steiger", "williams", "meng")

#: |1 − r_kh| below this counts as identical variables (k and h are the same up to an affine map)
IDENTICAL_TOL = 1e-10


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values; NaN entries (no test) stay NaN and are not counted."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return out


def dependent_correlation_test(r_jk: float, r_jh: float, r_kh: float, n: int,
                               method: str = "steiger") -> tuple[float, float]:
    """Two-sided test of H0: ρ_jk = ρ_jh for two *overlapping dependent* correlations on the same n cases.

    j is the shared variable (the rating), k and h the two others (a metric under checkpoint A and
    under checkpoint B, measured on the same images); ``r_kh`` is their correlation. The independent-
    samples Fisher z test is wrong here: it ignores r_kh. Returns ``(statistic, p)``:

    - ``"steiger"`` (default): Steiger's Z, Fisher-z difference with the pooled-r covariance of
      Steiger, J. H. (1980). Tests for comparing elements of a correlation matrix. *Psychological
      Bulletin* 87(2), 245–251, eq. 14: Z = (z_jk − z_jh) √(n − 3) / √(2 − 2c), c = ψ / (1 − r̄²)²,
      ψ = r_kh (1 − 2r̄²) − ½ r̄² (1 − 2r̄² − r_kh²), r̄ = (r_jk + r_jh)/2; normal reference.
    - ``"williams"``: Williams' (1959) T2 as recommended by Steiger (1980, eq. 7), t with n − 3 df:
      t = (r_jk − r_jh) √[(n − 1)(1 + r_kh) / (2 (n − 1)/(n − 3) |R| + r̄² (1 − r_kh)³)],
      |R| = 1 − r_jk² − r_jh² − r_kh² + 2 r_jk r_jh r_kh.
    - ``"meng"``: Meng, X.-L., Rosenthal, R. & Rubin, D. B. (1992). Comparing correlated correlation
      coefficients. *Psychological Bulletin* 111(1), 172–175: Z = (z_jk − z_jh) √[(n − 3) / (2(1 − r_kh) h)],
      h = (1 − f r̄²)/(1 − r̄²), f = min(1, (1 − r_kh) / (2(1 − r̄²))), r̄² = (r_jk² + r_jh²)/2.

    Degenerate cases are explicit rather than a division by zero: r_kh = 1 (within
    :data:`IDENTICAL_TOL`: k and h are the same variable, so r_jk = r_jh) gives (0, 1); n ≤ 3, a
    non-finite input, or |r_jk| or |r_jh| = 1 with Fisher's z (steiger, meng; unless r_jk = r_jh, which
    gives (0, 1)) gives (NaN, NaN).
    """
    if method not in DEPENDENT_METHODS:
        raise ValueError(f"method {method!r}: use one of {DEPENDENT_METHODS}")
    values = (r_jk, r_jh, r_kh)
    if n <= 3 or not all(math.isfinite(v) for v in values) or any(abs(v) > 1 + 1e-12 for v in values):
        return math.nan, math.nan
    if r_kh >= 1 - IDENTICAL_TOL:
        return 0.0, 1.0
    if r_jk == r_jh:
        return 0.0, 1.0
    if method == "williams":
        det = 1 - r_jk**2 - r_jh**2 - r_kh**2 + 2 * r_jk * r_jh * r_kh
        mean = (r_jk + r_jh) / 2
        denom = 2 * (n - 1) / (n - 3) * det + mean**2 * (1 - r_kh) ** 3
        if denom <= 0:
            return math.nan, math.nan
        t = (r_jk - r_jh) * math.sqrt((n - 1) * (1 + r_kh) / denom)
        return t, float(2 * stats.t.sf(abs(t), n - 3))
    if max(abs(r_jk), abs(r_jh)) >= 1:
        return math.nan, math.nan
    dz = math.atanh(r_jk) - math.atanh(r_jh)
    if method == "steiger":
        mean = (r_jk + r_jh) / 2
        psi = r_kh * (1 - 2 * mean**2) - 0.5 * mean**2 * (1 - 2 * mean**2 - r_kh**2)
        var = 2 - 2 * psi / (1 - mean**2) ** 2
    else:  # meng
        mean_sq = (r_jk**2 + r_jh**2) / 2
        f = min(1.0, (1 - r_kh) / (2 * (1 - mean_sq)))
        var = 2 * (1 - r_kh) * (1 - f * mean_sq) / (1 - mean_sq)
    if var <= 0:
        return math.nan, math.nan
    z = dz * math.sqrt((n - 3) / var)
    return z, float(2 * stats.norm.sf(abs(z)))


class CorrelationComparison(NamedTuple):
    """Result of :func:`compare_dependent_correlations`: ``difference`` = r_a − r_b, the test's ``statistic``
    (Z, or t for Williams) and two-sided ``p``, on ``n`` complete cases, with the three correlations used."""

    difference: float
    statistic: float
    p: float
    n: int
    r_a: float
    r_b: float
    r_ab: float


def compare_dependent_correlations(rating: np.ndarray, a: np.ndarray, b: np.ndarray, method: str = "steiger",
                                   rank: bool = False) -> CorrelationComparison:
    """Compare r(a, rating) with r(b, rating) measured on the same cases (two *dependent, overlapping* correlations).

    Used for one metric under two checkpoints: the images and the rating are shared, so the two
    correlations are correlated through r_ab = r(a, b) and the independent-samples Fisher z test
    (which assumes r_ab = 0) is miscalibrated — far too conservative when the checkpoints agree. The
    test is :func:`dependent_correlation_test` (default Steiger 1980, eq. 14/15: Fisher z of both
    correlations, covariance from the pooled r̄ = (r_a + r_b)/2).

    Only cases finite in all three arrays count (pairwise-complete: an image missing under either
    checkpoint is dropped). ``rank=True`` ranks the complete cases first and compares Spearman
    coefficients with the same formulas: the common large-sample approximation, not an exact test
    (for one coefficient Fieller, Hartley & Pearson 1957 give var(atanh ρ_s) ≈ 1.06/(n − 3) rather
    than 1/(n − 3), so it can be slightly liberal).

    Degenerate cases, explicitly: identical values (a == b, or identical ranks) give difference 0,
    statistic 0, p = 1 (the same correlation twice); r_ab = 1 up to :data:`IDENTICAL_TOL` (an affine
    copy) gives statistic 0, p = 1; fewer than 4 complete cases, a constant variable, or |r_a| or
    |r_b| = 1 (Fisher z infinite) give NaN statistic and p.
    """
    rating, a, b = (np.asarray(v, dtype=float) for v in (rating, a, b))
    keep = np.isfinite(rating) & np.isfinite(a) & np.isfinite(b)
    y, a, b = rating[keep], a[keep], b[keep]
    n = int(keep.sum())
    nan = math.nan
    if n <= 3 or np.ptp(y) == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return CorrelationComparison(nan, nan, nan, n, nan, nan, nan)
    if rank:
        y, a, b = stats.rankdata(y), stats.rankdata(a), stats.rankdata(b)
    r = np.corrcoef(np.vstack([y, a, b]))
    r_a, r_b, r_ab = float(r[0, 1]), float(r[0, 2]), float(r[1, 2])
    if np.array_equal(a, b):  # the same variable twice: the same correlation, exactly
        return CorrelationComparison(0.0, 0.0, 1.0, n, r_a, r_a, 1.0)
    statistic, p = dependent_correlation_test(r_a, r_b, r_ab, n, method)
    return CorrelationComparison(r_a - r_b, statistic, p, n, r_a, r_b, r_ab)
