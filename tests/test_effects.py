"""Analyses decide how they are shown: a third-party analysis that declares its effect size gets the same
summary row ("fluent?") and report heatmap as the built-in correlations; other kinds get their own sections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats

import fluency
from fluency.api import RESULT_COLUMNS, Analysis, AnalysisData, AnalysisSpec, EffectSize, hookimpl
from fluency.core.outputs.report import build_report
from fluency.core.outputs.summary import relations_table


class Kendall(Analysis):
    """Kendall's tau of each metric and layer with the rating."""

    def run(self, data: AnalysisData) -> pd.DataFrame:
        rows = []
        for (checkpoint, metric, layer), part in data.joined().groupby(["checkpoint", "metric", "layer"],
                                                                         dropna=False):
            tau = stats.kendalltau(part["value"], part["rating"])
            rows.append({"analysis": "kendall", "checkpoint": checkpoint, "metric": metric,
                         "layer": None if pd.isna(layer) else layer, "n": len(part), "statistic": "tau",
                         "estimate": float(tau.statistic), "p": float(tau.pvalue)})
        return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


class KendallPlugin:
    @hookimpl
    def fluency_register_analyses(self):
        return [AnalysisSpec("kendall", Kendall, "Kendall tau", effects=(EffectSize("tau", "Kendall τ"),))]


def test_a_third_party_analysis_is_summarised_and_drawn_like_pearson(tmp_path: Path, manager) -> None:
    manager.register(KendallPlugin(), "kendall", "fluency-kendall", "0.1")
    result = fluency.run(metrics=["gini"], analyses=["kendall", "ols"], out=str(tmp_path / "run"),
                         manager=manager, progress=False)
    strongest, sections = result.strongest(None), result.sections(None)
    assert set(strongest["analysis"]) == {"kendall"}  # ranked: the correlations only
    assert set(sections) == {"coefficient"} and set(sections["coefficient"]["statistic"]) == {"b"}
    assert result.manifest["analysis_effects"]["kendall"][0]["label"] == "Kendall τ"
    console = Console(record=True, width=120)
    console.print(relations_table(strongest, result.manifest["metric_columns"], result.effects()))
    text = console.export_text()
    # gini: higher = sparser = more fluent, so a negative tau goes against the theory
    expected = ["no" if t < 0 else "yes" for t in strongest["estimate"]]
    lines = [line for line in text.splitlines() if "Kendall τ" in line]
    assert len(lines) == len(strongest) and [line.split("│")[-2].strip() for line in lines] == expected
    tau = stats.kendalltau(*_gini_vs_rating(result, "enc5"))
    row = strongest[strongest["layer"] == "enc5"].iloc[0]
    assert row["estimate"] == pytest.approx(tau.statistic, abs=1e-12)
    page = build_report(result.path).read_text()
    assert (result.path / "figures" / "heatmap-kendall.png").exists() and 'alt="heatmap-kendall"' in page
    assert not (result.path / "figures" / "heatmap-ols-b.png").exists()  # coefficients of unlike scales


def _gini_vs_rating(result, layer: str) -> tuple[np.ndarray, np.ndarray]:
    m = result.metrics[(result.metrics["metric"] == "gini") & (result.metrics["layer"] == layer)]
    ratings = pd.read_parquet(result.path / "ratings.parquet")
    joined = m.merge(ratings, on="image_id")
    return joined["value"].to_numpy(float), joined[ratings.columns[1]].to_numpy(float)


@pytest.mark.parametrize("effect, message", [
    (EffectSize("tau", kind="odds"), "kind 'odds' is not one of"),
    (EffectSize("tau", range=(1.0, -1.0)), "low < high"),
    ("tau", "effects must be a tuple of EffectSize"),
])
def test_a_malformed_effect_declaration_breaks_the_plugin(effect, message) -> None:
    effects = effect if isinstance(effect, str) else (effect,)
    with pytest.raises(ValueError, match=message):
        AnalysisSpec("kendall", Kendall, effects=effects).check()
