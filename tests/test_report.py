"""The HTML report: self-contained, every figure embedded, every analysis as a sortable table."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

import fluency
from fluency.core.errors import FluencyError
from fluency.core.outputs.report import build_report


def test_report_is_self_contained_with_figures_and_tables(tmp_path: Path) -> None:
    result = fluency.run(metrics=["gini", "sam"], analyses=["pearson", "spearman", "ridge"],
                         options=["ridge.permutations=5", "ridge.repeats=2"], out=tmp_path / "run", progress=False)
    page = build_report(result.path).read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 2 + 1 + 1 + 2  # heatmaps, ridge bars, activation histograms, scatter plots
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("pearson", "spearman", "ridge", "metrics"):
        assert f'id="table-{name}"' in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch when viewing
    assert "Provenance" in page and result.manifest["run_id"] in page
    assert (result.path / "figures" / "heatmap-pearson.svg").exists()


def test_report_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(FluencyError, match="not a fluency run folder"):
        build_report(tmp_path)
