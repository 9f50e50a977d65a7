"""Analysis ``paired``: each metric's per-image values compared between checkpoints on the same images.

For every (metric, layer) and pair of checkpoints A, B (labels in sorted order, every pair, as the
``r_diff`` rows of ``pearson``), over the images with a finite value under both (pairwise
deletion; ``n`` says how many), on the differences d = value_A − value_B:

- ``estimate`` (``statistic`` ``mean_diff``, ``checkpoint`` ``"A−B"``): the mean of d, i.e. mean_A − mean_B
  (``mean_a``, ``mean_b``), with its Student-t confidence interval ``ci_low``, ``ci_high``:
  mean ± t_{n−1, (1+ci)/2} · sd / √n;
- ``p_t``: the two-sided paired t-test, t = mean / (sd / √n) on n − 1 degrees of freedom;
- ``p_wilcoxon``: the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``: zero differences
  discarded; exact null distribution for up to 50 differences without ties, else the normal approximation
  with tie correction);
- ``d_z`` = mean / sd (Cohen's d for paired samples) and ``r_rb``, the matched-pairs rank-biserial
  correlation (T₊ − T₋) / (T₊ + T₋) of the signed ranks of the non-zero |d| (Kerby 2014), the effect size
  that goes with the signed-rank test: both positive when A's values are higher.

``p`` — the one p-value of the row that enters the run-wide Benjamini–Hochberg family — is ``p_t`` by
default, the test of the estimate shown (its interval excludes 0 exactly when p_t < 1 − ci);
``-o paired.test=wilcoxon`` makes it ``p_wilcoxon`` (no normality assumption on d). The other stays a column.
Identical values under both checkpoints (every d = 0, up to round-off: |d| ≤ 1e-12 × the largest |value|)
give estimate 0 and no test (p NaN, out of the family) with a ``note``; a constant non-zero d (spread
within round-off) gives no t-test and no d_z (sd = 0). Ratings are not used:
the rows compare the models on the rated images (and within every ``--by`` subgroup).
"""

from __future__ import annotations

import warnings
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from fluency import Analysis, AnalysisData, AnalysisSpec, Option, hookimpl
from fluency.api import RESULT_COLUMNS, EffectSize

#: fewest images measured by both checkpoints for a test
MIN_N = 3
#: the columns besides :data:`RESULT_COLUMNS`
EXTRA_COLUMNS = ("ci_low", "ci_high", "mean_a", "mean_b", "sd_diff", "d_z", "r_rb", "p_t", "p_wilcoxon", "note")
TESTS = {"t": "p_t", "wilcoxon": "p_wilcoxon"}
#: differences within this fraction of the values' magnitude are round-off: all of them → identical values;
#: their spread → a constant difference
ROUND_OFF = 1e-12


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of the differences ``d``: (T₊ − T₋) / (T₊ + T₋), T± the sums
    of the (average) ranks of |d| over the positive and the negative differences; zeros are discarded,
    as the signed-rank test does. NaN when every difference is zero."""
    d = d[d != 0]
    if not len(d):
        return np.nan
    ranks = stats.rankdata(np.abs(d))
    plus, minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((plus - minus) / (plus + minus))


def paired_test(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """The paired comparison of two value vectors over the same images (NaN/inf in either: the pair is
    dropped): n, mean_a, mean_b, the mean difference with its t interval, sd, d_z, r_rb, p_t, p_wilcoxon, note."""
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = len(d)
    out: dict[str, Any] = {"n": n, "estimate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "mean_a": np.nan,
                           "mean_b": np.nan, "sd_diff": np.nan, "d_z": np.nan, "r_rb": np.nan, "p_t": np.nan,
                           "p_wilcoxon": np.nan, "note": ""}
    if n:
        out.update(estimate=float(d.mean()), mean_a=float(a.mean()), mean_b=float(b.mean()))
    if n < MIN_N:
        out["note"] = f"fewer than {MIN_N} images measured by both checkpoints"
        return out
    tol = ROUND_OFF * float(max(np.abs(a).max(), np.abs(b).max()))
    if (np.abs(d) <= tol).all():
        out.update(estimate=0.0, ci_low=0.0, ci_high=0.0, sd_diff=0.0,
                   note="identical values under both checkpoints (every difference is 0): nothing to test")
        return out
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if np.ptp(d) <= tol:  # a constant shift, up to round-off: sd is noise, t and d_z would be arbitrary
        sd = 0.0
    out.update(sd_diff=sd, r_rb=rank_biserial(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties and zeros; the note says how many zeros
        out["p_wilcoxon"] = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
    zeros = int((d == 0).sum())
    notes = [f"{zeros} zero difference{'s' if zeros > 1 else ''} left out of the signed-rank test"] if zeros else []
    if sd == 0:
        notes.append("constant difference (sd = 0): no t-test, no d_z")
    else:
        se = sd / np.sqrt(n)
        t = mean / se
        half = float(stats.t.ppf((1 + level) / 2, n - 1)) * se
        out.update(ci_low=mean - half, ci_high=mean + half, d_z=mean / sd, p_t=float(2 * stats.t.sf(abs(t), n - 1)))
        notes.insert(0, f"t = {t:.3f} ({n - 1} df)")
    out["note"] = "; ".join(notes)
    return out


class Paired(Analysis):
    """Paired differences of each metric's per-image values between every pair of checkpoints."""

    name = "paired"

    def run(self, data: AnalysisData) -> pd.DataFrame:
        level = float(self.options.get("ci", 0.95))
        family = TESTS[str(self.options.get("test", "t"))]
        rows: list[dict[str, Any]] = []
        for metric, layer in data.groups("metric", "layer"):
            group = data.rows(metric=metric, layer=layer)
            wide = group.pivot_table(index="image_id", columns="checkpoint", values="value", aggfunc="first",
                                     dropna=False)
            for a, b in combinations(sorted(group["checkpoint"].unique()), 2):
                test = paired_test(wide[a].to_numpy(float), wide[b].to_numpy(float), level)
                rows.append({"analysis": self.name, "checkpoint": f"{a}−{b}", "metric": metric,
                             "layer": None if pd.isna(layer) else layer, "statistic": "mean_diff",
                             "p": test[family], **test})
        return pd.DataFrame(rows, columns=[*RESULT_COLUMNS, *EXTRA_COLUMNS])


@hookimpl
def fluency_register_analyses() -> list[AnalysisSpec]:
    return [AnalysisSpec(
        name="paired", factory=Paired,
        description="Paired difference of each metric's per-image values between checkpoints (mean A − B with "
                    "t interval, paired t and Wilcoxon signed-rank p, d_z, rank-biserial r).",
        options={"test": Option("str", "t", "the p-value that enters the run-wide FDR family: t (paired t-test, "
                                "the test of the mean difference shown) or wilcoxon (signed-rank); the other is "
                                "kept as a column", choices=tuple(TESTS)),
                 "ci": Option("float", 0.95, "confidence level of the t interval of the mean difference",
                              minimum=0.5, maximum=0.999)},
        effects=(EffectSize("mean_diff", "Δ mean", kind="difference", range=None, directional=False,
                            heatmap=False),))]
