"""Analyses ``pearson`` and ``spearman``: each metric (per checkpoint and layer) against the ratings.

One test per (checkpoint, metric, layer): the correlation coefficient, its
two-sided p-value (scipy) and n. fluency adds ``p_fdr``, Benjamini–Hochberg
across every test of the run, after all analyses have run.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats

from fluency import Analysis, AnalysisData, AnalysisSpec, hookimpl
from fluency.core.analysis import RESULT_COLUMNS

MIN_N = 3


class Correlation(Analysis):
    """Base of the two correlation analyses; subclasses set ``name``, ``statistic`` and ``test``."""

    name: ClassVar[str]
    statistic: ClassVar[str]

    @staticmethod
    def test(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        raise NotImplementedError

    def run(self, data: AnalysisData) -> pd.DataFrame:
        rows: list[dict[str, Any]] = []
        joined = data.joined()
        joined["layer"] = joined["layer"].astype(object).where(joined["layer"].notna(), None)
        for (checkpoint, metric, layer), group in joined.groupby(["checkpoint", "metric", "layer"], dropna=False,
                                                                  sort=True):
            group = group[np.isfinite(group["value"]) & np.isfinite(group["rating"])]
            x, y = group["value"].to_numpy(float), group["rating"].to_numpy(float)
            estimate, p, note = np.nan, np.nan, ""
            if len(x) < MIN_N:
                note = f"fewer than {MIN_N} images"
            elif np.ptp(x) == 0 or np.ptp(y) == 0:
                note = "constant values"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    estimate, p = self.test(x, y)
            rows.append({"analysis": self.name, "checkpoint": checkpoint, "metric": metric,
                         "layer": None if pd.isna(layer) else layer, "n": len(x), "statistic": self.statistic,
                         "estimate": float(estimate), "p": float(p), "note": note})
        return pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "note"])


class Pearson(Correlation):
    """Pearson's r with its two-sided p-value (``scipy.stats.pearsonr``)."""

    name, statistic = "pearson", "r"

    @staticmethod
    def test(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        res = stats.pearsonr(x, y)
        return float(res.statistic), float(res.pvalue)


class Spearman(Correlation):
    """Spearman's rank correlation rho with its two-sided p-value (``scipy.stats.spearmanr``)."""

    name, statistic = "spearman", "rho"

    @staticmethod
    def test(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        res = stats.spearmanr(x, y)
        return float(res.statistic), float(res.pvalue)


@hookimpl
def fluency_register_analyses() -> list[AnalysisSpec]:
    return [
        AnalysisSpec(name="pearson", factory=Pearson,
                     description="Pearson correlation r of each metric and layer with the rating (two-sided p)."),
        AnalysisSpec(name="spearman", factory=Spearman,
                     description="Spearman rank correlation rho of each metric and layer with the rating (two-sided p)."),
    ]
