"""The contract of an Analysis plugin: metric values against ratings → a result table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # only annotations: listing plugins must not import pandas
    import numpy as np
    import pandas as pd

    from fluency.core.plugin.metric_columns import MetricColumns

#: columns every analysis result has: ``statistic`` names the ``estimate`` (e.g. ``"r"``);
#: ``p`` is the test's two-sided p-value (NaN for descriptive analyses); ``layer`` is
#: None for whole-model metrics
RESULT_COLUMNS = ("analysis", "checkpoint", "metric", "layer", "n", "statistic", "estimate", "p")

#: optional columns of a result controlled for the run's covariates (:attr:`AnalysisData.covariates`):
#: ``estimate_adj`` (e.g. the partial r given the covariates, or ridge's ΔR² over them), its test's
#: ``p_adj`` and the ``covariates`` used (comma-separated); NaN on rows not adjusted (a covariate itself)
ADJUSTED_COLUMNS = ("estimate_adj", "p_adj", "covariates")

#: p-value columns that join the run-wide Benjamini–Hochberg family, and the column of their adjusted value
FDR_COLUMNS = {"p": "p_fdr", "p_adj": "p_adj_fdr"}


#: how an effect size is compared and shown: correlations are ranked together in the summary's main table;
#: every other kind gets its own short section (regression coefficients, cross-validated R², differences
#: between checkpoints, descriptive estimates that test nothing)
EFFECT_KINDS = ("correlation", "coefficient", "r2", "difference", "descriptive")


@dataclass(frozen=True)
class EffectSize:
    """How one ``statistic`` of an analysis' results is shown in the terminal summary and the report.

    ``kind`` (one of :data:`EFFECT_KINDS`) decides where rows go: only ``"correlation"`` rows are ranked
    against each other. ``range`` is the colour scale of the report's heatmaps (None: symmetric around 0
    from the data); ``directional``: the sign says whether more fluent images are rated higher (the
    summary's "fluent?" column); ``heatmap``: draw a metric × layer heatmap of the estimates.
    """

    statistic: str
    label: str = ""
    kind: Literal["correlation", "coefficient", "r2", "difference", "descriptive"] = "correlation"
    range: tuple[float, float] | None = (-1.0, 1.0)
    directional: bool = True
    heatmap: bool = True

    def check(self, where: str) -> None:
        """Raise ``ValueError`` (naming ``where``) if a field is malformed."""
        if not isinstance(self.statistic, str) or not self.statistic:
            raise ValueError(f"{where}: EffectSize.statistic must be a non-empty string")
        if self.kind not in EFFECT_KINDS:
            raise ValueError(f"{where}: EffectSize kind {self.kind!r} is not one of {list(EFFECT_KINDS)}")
        if self.range is not None and not (len(self.range) == 2 and all(math.isfinite(float(v)) for v in self.range)
                                           and float(self.range[0]) < float(self.range[1])):
            raise ValueError(f"{where}: EffectSize range {self.range!r} must be (low, high) with low < high")

    @property
    def title(self) -> str:
        """``label``, else the statistic's name."""
        return self.label or self.statistic

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, as the run's manifest records it (:meth:`from_dict` reads it back)."""
        return {"statistic": self.statistic, "label": self.label, "kind": self.kind,
                "range": list(self.range) if self.range is not None else None, "directional": self.directional,
                "heatmap": self.heatmap}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EffectSize:
        """The effect recorded by :meth:`as_dict`."""
        rng = data.get("range")
        return cls(str(data["statistic"]), str(data.get("label", "")), data.get("kind", "descriptive"),
                   (float(rng[0]), float(rng[1])) if rng else None, bool(data.get("directional", False)),
                   bool(data.get("heatmap", False)))


class AnalysisData:
    """Input of an analysis: the metric values of the analysed images, their ratings and covariates.

    ``ratings`` has one row per rated image with ``image_id``, the rating column ``rating_column`` and any
    other columns of the table. ``covariates`` (None when the run has none, e.g. ``--no-covariates``) holds
    the low-level image covariates the run controls for: one row per (``checkpoint``, ``image_id``), one
    column each (luminance, rms-contrast, ...); they are not among the metrics unless the user asked for
    them as metrics.

    The metric values are held per output (checkpoint, metric, layer), not as a long table, so that a run of
    100,000 images stays small: read them with :meth:`groups` and :meth:`rows`, one slice at a time.
    :attr:`metrics` builds the whole long table (``image_id, checkpoint, metric, layer, value``) on first
    use, for analyses that want it. ``metrics`` may be given as that long DataFrame.
    """

    def __init__(self, metrics: pd.DataFrame | MetricColumns, ratings: pd.DataFrame, rating_column: str,
                 covariates: pd.DataFrame | None = None) -> None:
        self.metrics = metrics  # type: ignore[assignment]
        self.ratings = ratings
        self.rating_column = rating_column
        self.covariates = covariates
        self._rating_of: pd.Series | None = None

    @property
    def metrics(self) -> pd.DataFrame:
        """The long metric table (``image_id, checkpoint, metric, layer, value``; ``layer`` None for
        whole-model metrics), restricted to the analysed images; built on first use."""
        if self._metrics is None:
            self._metrics = self.columns.to_long()
        return self._metrics

    @metrics.setter
    def metrics(self, table: pd.DataFrame | MetricColumns) -> None:
        from fluency.core.plugin.metric_columns import as_columns

        self.columns = as_columns(table)
        self._metrics = None if self.columns is table else table

    def groups(self, *fields: str) -> list[tuple[str | None, ...]]:
        """The distinct values of ``fields`` (of ``checkpoint``, ``metric``, ``layer``) over the outputs,
        sorted (a missing layer, None, last): e.g. ``groups("checkpoint", "metric", "layer")`` lists every
        output, ``groups("metric", "layer")`` what to compare across checkpoints."""
        from fluency.core.plugin.metric_columns import output_order

        where = {"checkpoint": 0, "metric": 1, "layer": 2}
        unknown = [f for f in fields if f not in where]
        if unknown or not fields:
            raise TypeError(f"groups(): name one or more of {list(where)}, not {unknown or 'none'}")
        found = {tuple(key[where[f]] for f in fields) for key in self.columns.outputs()}
        return sorted(found, key=output_order)

    def rows(self, **where: str | None) -> pd.DataFrame:
        """The long rows (``image_id, checkpoint, metric, layer, value``) of the outputs whose fields equal
        ``where`` (e.g. ``checkpoint="default", metric="gini"``; ``layer=None`` selects whole-model outputs),
        with each image's ``rating`` (NaN for an image the ratings table lacks), in the table's order."""
        rows = self.columns.rows(**where)
        return rows.assign(rating=self._ratings().reindex(rows["image_id"]).to_numpy())

    def _ratings(self) -> pd.Series:
        if self._rating_of is None:
            first = self.ratings.drop_duplicates("image_id")
            self._rating_of = first.set_index("image_id")[self.rating_column]
        return self._rating_of

    @property
    def covariate_names(self) -> tuple[str, ...]:
        """The covariates' names (empty without covariates)."""
        if self.covariates is None:
            return ()
        return tuple(str(c) for c in self.covariates.columns if c not in ("checkpoint", "image_id"))

    def covariate_matrix(self, checkpoint: str, image_ids: Sequence[str]) -> np.ndarray | None:
        """n×k covariates of ``image_ids`` (in that order) under ``checkpoint``; NaN where one is missing;
        None without covariates."""
        names = self.covariate_names
        if not names:
            return None
        table = self.covariates[self.covariates["checkpoint"] == checkpoint].drop_duplicates("image_id")  # type: ignore[index]
        return table.set_index("image_id")[list(names)].reindex(list(image_ids)).to_numpy(float)

    def joined(self) -> pd.DataFrame:
        """The whole metric table with the rating of each image as a ``rating`` column (rated images only)."""
        r = self.ratings[["image_id", self.rating_column]].rename(columns={self.rating_column: "rating"})
        return self.metrics.merge(r, on="image_id", how="inner")


class Analysis:
    """Base class of analyses: :meth:`run` returns a DataFrame with at least :data:`RESULT_COLUMNS`.

    ``p`` holds the test's two-sided p-value; fluency adds ``p_fdr``
    (Benjamini–Hochberg across every test of the run) afterwards. An analysis that controls for the
    run's covariates adds :data:`ADJUSTED_COLUMNS`; its ``p_adj`` joins the same family (``p_adj_fdr``).
    """

    def __init__(self, **options: Any) -> None:
        self.options = options

    def run(self, data: AnalysisData) -> pd.DataFrame:
        """One row per test on ``data`` (the metric table and the ratings of the analysed images)."""
        raise NotImplementedError
