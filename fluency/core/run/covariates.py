"""The low-level covariates every answer is controlled for: the outputs of the ``image-stats`` metric.

Whenever the images are at hand (``fluency run``; ``fluency measure --images``), the run also computes
``image-stats`` (luminance, RMS contrast, spectral slope, edge density, JPEG bits per pixel) even if
no one asked for it, and the analyses report each relation raw and controlling for those values
(:attr:`fluency.core.plugin.analysis.AnalysisData.covariates`). The covariates are not hypotheses:
added automatically, they stay out of the analysed metric table (their values are in
``metrics.parquet``); asked for with ``--metric image-stats``, they are analysed raw like any metric,
but never adjusted for themselves. ``--no-covariates`` turns all of this off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from fluency.core.plugin.metric_columns import MetricColumns

#: the metric plugin whose outputs are the covariates
COVARIATE_PLUGIN = "image-stats"


@dataclass(frozen=True)
class Covariates:
    """The covariates of a run: the metric columns written by :data:`COVARIATE_PLUGIN`.

    ``requested``: the user named the plugin as a metric, so its columns are analysed raw too;
    otherwise they are covariates only.
    """

    columns: tuple[str, ...]
    requested: bool
    plugin: str = COVARIATE_PLUGIN

    @classmethod
    def of(cls, metric_columns: Mapping[str, Mapping[str, Any]], requested: bool) -> Covariates | None:
        """The covariates among a run's ``metric_columns`` (manifest: column -> {"plugin", ...}); None if absent."""
        columns = tuple(c for c, info in metric_columns.items() if info.get("plugin") == COVARIATE_PLUGIN)
        return cls(columns, requested) if columns else None

    def record(self) -> dict[str, Any]:
        """The manifest's ``covariates`` entry."""
        return {"plugin": self.plugin, "columns": list(self.columns), "requested": self.requested}

    def split(self, metrics: MetricColumns) -> tuple[MetricColumns, pd.DataFrame]:
        """(the metric values the analyses test, the covariates wide: ``checkpoint, image_id`` + one column
        each, NaN where an image lacks one)."""
        covariate = [k for k in metrics.outputs() if k[1] in self.columns and k[2] is None]
        frames = []
        for checkpoint in dict.fromkeys(k[0] for k in covariate):
            mine = {k[1]: k for k in covariate if k[0] == checkpoint}
            names = [c for c in self.columns if c in mine]
            wide = metrics.wide([mine[c] for c in names]).set_axis(names, axis=1).reindex(columns=list(self.columns))
            frames.append(wide.reset_index().assign(checkpoint=checkpoint))
        wide = (pd.concat(frames, ignore_index=True) if frames else
                pd.DataFrame(columns=["image_id", "checkpoint", *self.columns]))
        wide = wide[["checkpoint", "image_id", *self.columns]]
        tested = metrics if self.requested else metrics.select(k for k in metrics.outputs() if k not in set(covariate))
        return tested, wide


def with_covariates(metrics: Sequence[str], on: bool) -> tuple[list[str], bool]:
    """``(the metrics to compute, whether the user asked for the covariates' plugin)``: the covariate plugin is
    appended when ``on`` and not already named."""
    names = list(dict.fromkeys(metrics))
    requested = COVARIATE_PLUGIN in names
    if on and not requested:
        names.append(COVARIATE_PLUGIN)
    return names, requested
