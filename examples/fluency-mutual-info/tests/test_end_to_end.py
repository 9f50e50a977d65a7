"""The three plugins in a real run on fluency's embedded default (240 generated images, the shipped model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fluency
from fluency.api import FluencyError, get_plugin_manager

from fluency_mutual_info import plugin


def test_run_on_the_embedded_default(tmp_path: Path) -> None:
    manager = get_plugin_manager()
    try:
        manager.get("analysis", "layer-mi")  # installed: loaded from the entry point already
    except FluencyError:
        manager.register(plugin, "mutual-info-test", "fluency-mutual-info", "0.1.0")
    result = fluency.run(metrics=["activation-entropy", "mutual-info"], analyses=["layer-mi"],
                         out=str(tmp_path / "run"), manager=manager, progress=False, figures=False, store=False,
                         device="cpu")
    metrics = result.metrics
    for name in ("activation-entropy", "mutual-info"):
        rows = metrics[metrics["metric"] == name]
        assert rows.groupby("layer")["image_id"].nunique().eq(240).all() and np.isfinite(rows["value"]).all()
    entropy = metrics.loc[metrics["metric"] == "activation-entropy", "value"]
    assert entropy.between(0, np.log2(64)).all()
    table = result.analyses["layer-mi"]
    assert len(table) == metrics.loc[metrics["metric"] == "mutual-info", "layer"].nunique()
    for row in table.itertuples():
        values = metrics[(metrics["metric"] == "mutual-info") & (metrics["layer"] == row.layer)]["value"]
        assert row.estimate == pytest.approx(values.mean()) and row.ci_low < row.estimate < row.ci_high
        assert row.estimate > 0.5  # bits: every layer of the trained model tracks the images' main variation
