"""Analysis ``ols``: ordinary least squares of the rating on each metric (statsmodels).

One model per (checkpoint, metric, layer): rating ~ metric (+ ``covariates``, numeric columns of
the ratings table) (+ ``C(group)`` for each of ``groups``, categorical columns). Reported:
the metric's coefficient (``estimate``), its standard error, t, two-sided p, R² and adjusted R²,
and the full coefficient table as JSON (``coefficients``). In-sample fit: for out-of-sample
prediction use ``ridge``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pandas as pd

from fluency import Analysis, AnalysisData, AnalysisSpec, Option, hookimpl
from fluency.api import RESULT_COLUMNS, EffectSize, FluencyError


def _safe(name: str) -> str:
    return "q_" + re.sub(r"\W", "_", name)


class OLS(Analysis):
    def run(self, data: AnalysisData) -> pd.DataFrame:
        import statsmodels.formula.api as smf

        covariates = list(self.options.get("covariates") or [])
        groups = list(self.options.get("groups") or [])
        missing = [c for c in covariates + groups if c not in data.ratings.columns]
        if missing:
            raise FluencyError(f"ols: {missing} are not columns of the ratings table {list(data.ratings.columns)}")
        extra = data.ratings.set_index("image_id")[covariates + groups]
        rows = []
        for checkpoint, metric, layer in data.groups("checkpoint", "metric", "layer"):
            group = data.rows(checkpoint=checkpoint, metric=metric, layer=layer)
            frame = group.set_index("image_id")[["value", "rating"]].join(extra)
            frame = frame.rename(columns={c: _safe(c) for c in covariates + groups})
            for c in covariates:
                frame[_safe(c)] = pd.to_numeric(frame[_safe(c)], errors="coerce")
            frame = frame.dropna()
            terms = ["value", *(_safe(c) for c in covariates), *(f"C({_safe(g)})" for g in groups)]
            row: dict[str, Any] = {"analysis": "ols", "checkpoint": checkpoint, "metric": metric,
                                   "layer": None if pd.isna(layer) else layer, "n": len(frame),
                                   "statistic": "b", "estimate": np.nan, "p": np.nan, "se": np.nan, "t": np.nan,
                                   "r2": np.nan, "r2_adj": np.nan, "coefficients": "", "note": ""}
            if len(frame) < len(terms) + 2 or frame["value"].nunique() < 2:
                row["note"] = "too few images or a constant metric"
            else:
                fit = smf.ols("rating ~ " + " + ".join(terms), data=frame).fit()
                row.update(estimate=float(fit.params["value"]), se=float(fit.bse["value"]),
                           t=float(fit.tvalues["value"]), p=float(fit.pvalues["value"]), r2=float(fit.rsquared),
                           r2_adj=float(fit.rsquared_adj),
                           coefficients=json.dumps({k: {"b": float(fit.params[k]), "se": float(fit.bse[k]),
                                                        "p": float(fit.pvalues[k])} for k in fit.params.index}))
            rows.append(row)
        return pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "se", "t", "r2", "r2_adj", "coefficients", "note"])


@hookimpl
def fluency_register_analyses() -> list[AnalysisSpec]:
    return [AnalysisSpec(
        name="ols", factory=OLS,
        effects=(EffectSize("b", "OLS slope b", kind="coefficient", range=None, heatmap=False),),
        description="OLS of the rating on each metric (+ covariates, + categorical groups): b, SE, p, R², adj. R².",
        options={"covariates": Option("list[str]", None, "numeric ratings-table columns to control for"),
                 "groups": Option("list[str]", None, "categorical ratings-table columns (C(...) terms)")})]
