"""The contract of an Analysis plugin: metric values against ratings → a result table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

#: columns every analysis result has: ``statistic`` names the ``estimate`` (e.g. ``"r"``);
#: ``p`` is the test's two-sided p-value (NaN for descriptive analyses); ``layer`` is
#: None for whole-model metrics
RESULT_COLUMNS = ("analysis", "checkpoint", "metric", "layer", "n", "statistic", "estimate", "p")


@dataclass
class AnalysisData:
    """Input of an analysis.

    ``metrics`` is the long metric table (``image_id, checkpoint, metric, layer,
    value``), restricted to rated images; ``ratings`` has one row per rated image with
    ``image_id``, the rating column ``rating_column`` and any other columns of the table.
    """

    metrics: pd.DataFrame
    ratings: pd.DataFrame
    rating_column: str

    def joined(self) -> pd.DataFrame:
        """The metric table with the rating of each image as a ``rating`` column."""
        r = self.ratings[["image_id", self.rating_column]].rename(columns={self.rating_column: "rating"})
        return self.metrics.merge(r, on="image_id", how="inner")


class Analysis:
    """Base class of analyses: :meth:`run` returns a DataFrame with at least :data:`RESULT_COLUMNS`.

    ``p`` holds the test's two-sided p-value; fluency adds ``p_fdr``
    (Benjamini–Hochberg across every test of the run) afterwards.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options

    def run(self, data: AnalysisData) -> pd.DataFrame:
        """One row per test on ``data`` (the metric table and the ratings of the analysed images)."""
        raise NotImplementedError
