"""Analyses ``pearson``, ``spearman`` and ``partial``: each metric (per checkpoint and layer) against the ratings.

One test per (checkpoint, metric, layer): the coefficient, its two-sided p-value (scipy), n
and a percentile bootstrap confidence interval (``n_boot`` resamples of the images, seeded).
``partial`` is Pearson's (or, with ``method="spearman"``, Spearman's) correlation after
regressing both the metric and the rating on ``covariates`` (columns of the ratings table,
or other metrics of the run written ``metric`` or ``metric@layer``), with n − 2 − k degrees
of freedom. A metric that is itself a covariate (or a linear combination of them: its residual is
round-off) is not tested: its row has no estimate or p, the note says why, and it is not in the FDR
family. fluency adds ``p_fdr``, Benjamini–Hochberg across every test of the run.

With the run's low-level covariates (:attr:`fluency.AnalysisData.covariates`, the ``image-stats``
values; off with ``--no-covariates``), ``pearson`` and ``spearman`` rows also carry the relation
controlling for them: ``estimate_adj`` (partial r given every covariate, Spearman's on ranks; the
same computation as ``partial``), ``p_adj`` (n − 2 − k df; in the run-wide family as ``p_adj_fdr``)
and ``covariates``. A metric that is itself a covariate is not adjusted (NaN): not a hypothesis.

With two or more checkpoints, ``pearson`` and ``spearman`` also compare them: for every (metric,
layer) and pair of checkpoints (A, B) a row with ``statistic`` ``r_diff`` (``rho_diff``),
``checkpoint`` ``"A−B"``, ``estimate`` = r_A − r_B and the two-sided p of the test of equal
*dependent, overlapping* correlations (the same images, the same rating; Steiger 1980 by default,
see :func:`fluency.core.stats.compare_dependent_correlations`), on the images measured by both;
Spearman's on ranks. Those rows also fill ``r_a``, ``r_b`` (the two correlations on those images) and
``r_ab`` (the metric under A against the metric under B). They join the run-wide Benjamini–Hochberg
correction like every other test; subgroups (``--by``) get their own comparison rows.
"""

from __future__ import annotations

import warnings
from itertools import combinations
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats

from fluency import Analysis, AnalysisData, AnalysisSpec, Option, hookimpl
from fluency.api import (ADJUSTED_COLUMNS, DEPENDENT_METHODS, RESULT_COLUMNS, EffectSize, FluencyError,
                         compare_dependent_correlations)

MIN_N = 3
BOOT_OPTIONS = {
    "n_boot": Option("int", 1000, "bootstrap resamples for the confidence interval (0: none)", minimum=0),
    "ci": Option("float", 0.95, "confidence level of the interval", minimum=0.5, maximum=0.999),
    "seed": Option("int", 0, "seed of the bootstrap resampling"),
}
COMPARE_OPTIONS = {
    "diff_test": Option("str", "steiger", "test of r_A − r_B between checkpoints (dependent correlations): "
                        "steiger (Steiger 1980 Z), williams (Williams' t), meng (Meng et al. 1992 Z) or none",
                        choices=(*DEPENDENT_METHODS, "none")),
}
#: columns of the comparison rows only (NaN on the others): the two correlations and r between the checkpoints
COMPARE_COLUMNS = ("r_a", "r_b", "r_ab")
#: ``partial``: a metric whose residual on the covariates is below this fraction of its own spread is (in the
#: span of) a covariate: what is left is round-off, so it is not tested (no p, not in the FDR family)
SPAN_TOLERANCE = 1e-6
COVARIATE_NOTE = "a covariate itself (in the span of the covariates): not tested"
#: names of the dependent-correlation tests, for the ``note`` of each comparison row
TEST_NAMES = {"steiger": "Steiger (1980) Z", "williams": "Williams' t (n−3 df)", "meng": "Meng et al. (1992) Z"}


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair of two R×n arrays."""
    x = x - x.mean(1, keepdims=True)
    y = y - y.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))


#: bootstrap index values drawn and correlated at a time: the resamples go in blocks of about this many, so
#: memory stays flat in the number of images (all at once: ~80 KB per image for 1000 resamples; issue 16)
BOOT_BLOCK = 1 << 19


def bootstrap_ci(x: np.ndarray, y: np.ndarray, rank: bool, n_boot: int, level: float,
                 rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of Pearson's r (or Spearman's rho with ``rank``), resampling pairs."""
    if n_boot == 0:
        return np.nan, np.nan
    # an even number of rows per block: every block but the last draws an even count of indices, so the draws
    # (and ``rng`` after them) are those of one call for all ``n_boot`` resamples
    step = max(2, BOOT_BLOCK // max(len(x), 1) // 2 * 2)
    if rank:  # ranked once here; each resample's ranks are counted from these codes (_resample_ranks)
        x, y = _dense_codes(x), _dense_codes(y)
    r = np.concatenate([_bootstrap_r(x, y, rank, min(step, n_boot - start), rng)
                        for start in range(0, n_boot, step)])
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return np.nan, np.nan
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _bootstrap_r(x: np.ndarray, y: np.ndarray, rank: bool, count: int, rng: np.random.Generator) -> np.ndarray:
    """The correlations of ``count`` resamples of the pairs (x, y); with ``rank``, x and y are the values'
    :func:`_dense_codes`."""
    idx = rng.integers(0, len(x), size=(count, len(x)))
    if rank:
        return _rowwise_pearson(_resample_ranks(x, idx), _resample_ranks(y, idx))
    return _rowwise_pearson(x[idx], y[idx])


def _dense_codes(v: np.ndarray) -> np.ndarray:
    """Each value's place among the distinct values of ``v`` (0 for the smallest; equal values, equal codes)."""
    return stats.rankdata(v, method="dense").astype(np.intp) - 1


def _resample_ranks(groups: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``scipy.stats.rankdata(v[idx], axis=1)`` (average ranks), given ``groups = _dense_codes(v)``, by
    counting instead of sorting each resample.

    A drawn value's rank depends only on its place among ``v``'s distinct values: with ``counts[g]`` draws of
    the g-th smallest value in a row, they share the average rank ``(draws of smaller values) + (counts[g] +
    1) / 2``, the mean of the places they fill. Counting per row is O(n) a resample, not O(n log n); the
    half-integer ranks are exact, so the result is bit-identical to sorting."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    drawn = groups[idx]
    rows = np.arange(len(idx), dtype=np.intp)[:, None] * n_groups
    counts = np.bincount((drawn + rows).ravel(), minlength=len(idx) * n_groups).reshape(len(idx), n_groups)
    average = np.cumsum(counts, axis=1) - (counts - 1) / 2
    return np.take_along_axis(average, drawn, axis=1)


def residualize(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Residuals of ``v`` after least squares on ``z`` (with an intercept)."""
    design = np.column_stack([np.ones(len(v)), z])
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    return v - design @ coef


def correlation_test(x: np.ndarray, y: np.ndarray, z: np.ndarray | None, rank: bool) -> tuple[float, float]:
    """(r, two-sided p) of x and y — Pearson's, or with ``rank`` Spearman's on ranks — partialled on the columns
    of ``z`` (None: none; ranked too with ``rank``): r of the residuals of both on z, t test with n − 2 − k df.
    (NaN, NaN) when x is a covariate itself (in the span of z, to :data:`SPAN_TOLERANCE`)."""
    if rank:
        x, y = stats.rankdata(x), stats.rankdata(y)
        if z is not None:
            z = np.column_stack([stats.rankdata(c) for c in z.T])
    if z is not None:
        rx = residualize(x, z)
        if np.linalg.norm(rx) <= SPAN_TOLERANCE * np.linalg.norm(x - x.mean()):
            return np.nan, np.nan  # x is (in the span of) a covariate: what is left is round-off, not a test
        x, y = rx, residualize(y, z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate = float(stats.pearsonr(x, y).statistic)
    dof = len(x) - 2 - (0 if z is None else z.shape[1])
    t = estimate * np.sqrt(dof / max(1e-300, 1 - estimate**2))
    return estimate, float(2 * stats.t.sf(abs(t), dof))


class Correlation(Analysis):
    """Base of the correlation analyses; subclasses set ``name``, ``statistic`` and ``rank``."""

    name: ClassVar[str]
    statistic: ClassVar[str]
    rank: ClassVar[bool]
    #: add r_A − r_B rows for every pair of checkpoints (not for ``partial``)
    compares_checkpoints: ClassVar[bool] = False
    #: with the run's covariates, add the relation controlling for them (not for ``partial``)
    adjusts: ClassVar[bool] = False

    def covariates(self, data: AnalysisData, rows: pd.DataFrame) -> np.ndarray | None:
        return None

    def run(self, data: AnalysisData) -> pd.DataFrame:
        out: list[dict[str, Any]] = []
        rng = np.random.default_rng(int(self.options.get("seed", 0)))
        level = float(self.options.get("ci", 0.95))
        for checkpoint, metric, layer in data.groups("checkpoint", "metric", "layer"):
            group = data.rows(checkpoint=checkpoint, metric=metric, layer=layer)
            group = group[np.isfinite(group["value"]) & np.isfinite(group["rating"])]
            z = self.covariates(data, group)
            if z is not None:
                keep = np.isfinite(z).all(axis=1)
                group, z = group[keep], z[keep]
            x, y = group["value"].to_numpy(float), group["rating"].to_numpy(float)
            k = 0 if z is None else z.shape[1]
            estimate = p = lo = hi = np.nan
            note = ""
            if len(x) < MIN_N + k:
                note = f"fewer than {MIN_N + k} images"
            elif np.ptp(x) == 0 or np.ptp(y) == 0:
                note = "constant values"
            else:
                estimate, p = correlation_test(x, y, z, self.rank)
                if z is not None and not np.isfinite(estimate):
                    note = COVARIATE_NOTE
                if z is None:
                    lo, hi = bootstrap_ci(x, y, self.rank, int(self.options.get("n_boot", 1000)), level, rng)
            out.append({"analysis": self.name, "checkpoint": checkpoint, "metric": metric,
                        "layer": None if pd.isna(layer) else layer, "n": len(x), "statistic": self.statistic,
                        "estimate": estimate, "p": p, "ci_low": lo, "ci_high": hi, "note": note})
            if self.adjusts and data.covariate_names:
                out[-1].update(self.adjusted(data, group, metric))
        method = str(self.options.get("diff_test", "steiger"))
        if self.compares_checkpoints and method != "none" and len(data.groups("checkpoint")) > 1:
            out += self.compare_checkpoints(data, method)
        extra = COMPARE_COLUMNS if any("r_ab" in row for row in out) else ()
        adjusted = ADJUSTED_COLUMNS if self.adjusts and data.covariate_names else ()
        return pd.DataFrame(out, columns=[*RESULT_COLUMNS, "ci_low", "ci_high", "note", *extra, *adjusted])

    def adjusted(self, data: AnalysisData, group: pd.DataFrame, metric: str) -> dict[str, Any]:
        """The relation of one (checkpoint, metric, layer) controlling for the run's covariates: ``estimate_adj``
        (partial r, Spearman's on ranks) and ``p_adj``; NaN for a covariate itself (not a hypothesis) or too few
        images."""
        names = data.covariate_names
        row: dict[str, Any] = {"estimate_adj": np.nan, "p_adj": np.nan, "covariates": ",".join(names)}
        if metric in names or not len(group):
            return row
        z = data.covariate_matrix(group["checkpoint"].iloc[0], group["image_id"])
        keep = np.isfinite(z).all(axis=1)
        x, y, z = group["value"].to_numpy(float)[keep], group["rating"].to_numpy(float)[keep], z[keep]
        z = z[:, np.ptp(z, axis=0) > 0]  # a constant covariate (e.g. within a subgroup) carries nothing
        if len(x) >= MIN_N + z.shape[1] and np.ptp(x) > 0 and np.ptp(y) > 0:
            row["estimate_adj"], row["p_adj"] = correlation_test(x, y, z, self.rank)
        return row

    def compare_checkpoints(self, data: AnalysisData, method: str) -> list[dict[str, Any]]:
        """One row per (metric, layer, pair of checkpoints A < B): r_A − r_B and its dependent-correlation test.

        The two correlations share the rating and are measured on the same images, so they are
        tested as dependent overlapping correlations using r_AB, the correlation of the metric under A
        with the metric under B over the images that have finite values under both (Spearman: of the
        ranks, re-ranked on those images).
        """
        out: list[dict[str, Any]] = []
        for metric, layer in data.groups("metric", "layer"):
            group = data.rows(metric=metric, layer=layer)
            wide = group.pivot_table(index="image_id", columns="checkpoint", values="value", aggfunc="first")
            rating = group.groupby("image_id")["rating"].first().reindex(wide.index)
            for a, b in combinations(sorted(wide.columns), 2):
                test = compare_dependent_correlations(rating.to_numpy(float), wide[a].to_numpy(float),
                                                      wide[b].to_numpy(float), method, rank=self.rank)
                if test.n <= MIN_N:
                    note = f"fewer than {MIN_N + 1} images measured by both checkpoints"
                elif not np.isfinite(test.r_ab):
                    note = "constant values"
                elif np.isfinite(test.statistic):
                    note = f"{TEST_NAMES[method]} = {test.statistic:.3f}; r between checkpoints = {test.r_ab:.3f}"
                else:
                    note = "test undefined (|r| = 1)"
                out.append({"analysis": self.name, "checkpoint": f"{a}−{b}", "metric": metric,
                            "layer": None if pd.isna(layer) else layer, "n": test.n,
                            "statistic": f"{self.statistic}_diff", "estimate": test.difference, "p": test.p,
                            "ci_low": np.nan, "ci_high": np.nan, "note": note,
                            "r_a": test.r_a, "r_b": test.r_b, "r_ab": test.r_ab})
        return out


class Pearson(Correlation):
    """Pearson's r with its two-sided p-value and a bootstrap confidence interval."""

    name, statistic, rank = "pearson", "r", False
    compares_checkpoints = adjusts = True


class Spearman(Correlation):
    """Spearman's rho (Pearson's r of the ranks) with its two-sided p-value and a bootstrap interval."""

    name, statistic, rank = "spearman", "rho", True
    compares_checkpoints = adjusts = True


class Partial(Correlation):
    """Partial correlation controlling for covariates (ratings-table columns or other metrics)."""

    name, statistic = "partial", "r_partial"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.rank = self.options.get("method", "pearson") == "spearman"
        if not self.options.get("covariates"):
            raise FluencyError("partial: name the covariates, e.g. -o partial.covariates='[\"face_age\"]' or a "
                               "metric such as '[\"luminance\", \"rms-contrast\"]'")

    def covariates(self, data: AnalysisData, rows: pd.DataFrame) -> np.ndarray:
        columns = []
        for name in self.options["covariates"]:
            if name in data.ratings.columns:
                values = pd.to_numeric(data.ratings.set_index("image_id")[name], errors="coerce")
            elif name in data.covariate_names:  # computed by the run as a covariate, not a tested metric
                table = data.covariates[data.covariates["checkpoint"] == rows["checkpoint"].iloc[0]]  # type: ignore[index]
                values = table.set_index("image_id")[name]
            else:
                metric, _, layer = name.partition("@")
                m = data.rows(checkpoint=rows["checkpoint"].iloc[0], metric=metric, layer=layer or None)
                if m.empty:
                    raise FluencyError(f"partial: covariate {name!r} is neither a ratings column "
                                       f"({list(data.ratings.columns)}) nor a metric of this run")
                values = m.set_index("image_id")["value"]
            columns.append(values.reindex(rows["image_id"]).to_numpy(float))
        return np.column_stack(columns)


def _difference(statistic: str) -> EffectSize:
    """The checkpoint comparison ``<statistic>_diff`` (A − B): its sign says which checkpoint relates more."""
    return EffectSize(f"{statistic}_diff", f"{statistic}_A − {statistic}_B", kind="difference", range=None,
                      directional=False)


@hookimpl
def fluency_register_analyses() -> list[AnalysisSpec]:
    return [
        AnalysisSpec(name="pearson", factory=Pearson, options={**BOOT_OPTIONS, **COMPARE_OPTIONS},
                     description="Pearson correlation r of each metric and layer with the rating (p, bootstrap CI).",
                     effects=(EffectSize("r", "Pearson r"), _difference("r"))),
        AnalysisSpec(name="spearman", factory=Spearman, options={**BOOT_OPTIONS, **COMPARE_OPTIONS},
                     description="Spearman rank correlation rho of each metric and layer with the rating (p, "
                                 "bootstrap CI).",
                     effects=(EffectSize("rho", "Spearman ρ"), _difference("rho"))),
        AnalysisSpec(name="partial", factory=Partial, effects=(EffectSize("r_partial", "partial r"),),
                     description="Partial correlation of each metric with the rating, controlling for covariates.",
                     options={"covariates": Option("list[str]", None, "ratings-table columns or metrics "
                                                   "('metric' or 'metric@layer') to control for"),
                              "method": Option("str", "pearson", "pearson or spearman (on ranks)",
                                               choices=("pearson", "spearman"))}),
    ]
