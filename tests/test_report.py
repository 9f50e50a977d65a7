"""The HTML report: self-contained, every figure embedded, every analysis as a sortable table; figures
readable at the size the report shows them; counts as integers; provenance as a collapsed summary."""

from __future__ import annotations

import base64
import html
import json
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib.text
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import fluency
from fluency.core.errors import FluencyError
from fluency.core.outputs import figures
from fluency.core.outputs.report import build_report, metric_correlations
from fluency.core.outputs.report_html import provenance_facts, table


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> fluency.RunResult:
    """The embedded default with three analyses and ``--by clutter`` subgroups."""
    return fluency.run(metrics=["gini", "lepsilon"], analyses=["pearson", "spearman", "ridge"], by=["clutter"],
                       min_group_size=15, options=["ridge.permutations=3", "ridge.repeats=2", "pearson.n_boot=50",
                                                   "spearman.n_boot=50"],
                       out=tmp_path_factory.mktemp("report") / "run", progress=False)


@pytest.fixture(scope="module")
def page(run: fluency.RunResult) -> str:
    return build_report(run.path).read_text(encoding="utf-8")


def test_report_is_self_contained_with_figures_and_tables(run: fluency.RunResult, page: str) -> None:
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 2 + 1 + 1 + 2  # heatmaps, ridge bars, activation histograms, scatter plots
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("pearson", "spearman", "ridge", "metrics"):
        assert f'id="table-{name}"' in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch when viewing
    assert "Provenance" in page and run.manifest["run_id"] in page
    assert (run.path / "figures" / "heatmap-pearson.svg").exists()
    # every figure is a link to its own full-window view, shown at its natural size
    for stem in re.findall(r'<img alt="([^"]+)"', page):
        assert f'<figure id="fig-{stem}"><a class="close" href="#_"' in page
        assert f'<a href="#fig-{stem}" title="full size"><img alt="{stem}" width=' in page


def test_counts_are_integers(page: str) -> None:
    frame = pd.DataFrame({"metric": ["gini"], "n": [240.0], "count": [240.0], "mean": [0.5], "n_images": [np.nan]})
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", table(frame, list(frame.columns), "t"))
    assert cells == ["gini", "240", "240", "0.5000", "–"]
    shown = 0
    for body in re.findall(r'<table class="sortable".*?</table>', page, re.S):
        heads = re.findall(r"<th>([^<]*)</th>", body)
        for row in re.findall(r"<tr[^>]*>(<td.*?)</tr>", body):
            cells = dict(zip(heads, re.findall(r"<td[^>]*>([^<]*)</td>", row)))
            for column in {"n", "count"} & set(cells):
                assert re.fullmatch(r"\d+|–", cells[column]), (column, cells[column])
                shown += 1
    assert shown > 100
    assert ">240<" in page[page.index('id="table-metrics"'):]


def test_provenance_is_a_collapsed_summary_with_the_manifest_inside(run: fluency.RunResult, page: str) -> None:
    section = page[page.index('<details id="provenance">'):]
    assert section.startswith('<details id="provenance"><summary><h2>Provenance</h2></summary>')  # closed
    facts = dict(provenance_facts(run.manifest))
    assert {"fluency version", "date", "command", "checkpoints", "stimuli", "metrics", "analyses", "seed"} <= set(facts)
    assert facts["fluency version"] == fluency.__version__ and facts["seed"] == "0"
    checkpoint = run.manifest["inputs"]["checkpoints"][0]
    assert f"<code>{checkpoint['sha256'][:12]}</code>" in facts["checkpoints"]
    assert checkpoint["sha256"] not in facts["checkpoints"]  # a prefix, not 64 hex digits
    assert "240 images" in facts["stimuli"] and "gini, lepsilon" in facts["metrics"]
    assert 'id="table-provenance"' in section
    nested = re.search(r'<details><summary>[^<]+</summary><pre id="manifest">(.*?)</pre></details></details>',
                       section, re.S)
    assert nested, "the manifest is not in a nested collapsed block"
    assert json.loads(html.unescape(nested.group(1))) == json.loads((run.path / "manifest.json").read_text())


def test_error_bars_histograms_and_colour_bars_are_explained(page: str) -> None:
    assert "Error bars: ± 1 SD of the per-fold R² over the 5 × 2 folds" in page
    assert "percentile bootstrap interval of r over images: [" in page  # a scatter plot's caption
    assert "y: number of images" in page and "y: number of units" in page


def test_subgroups_are_heatmaps_too(run: fluency.RunResult, page: str) -> None:
    groups = [g["group"] for g in run.manifest["subgroups"]["groups"] if g["analysed"]]
    assert len(groups) >= 3
    assert "<h2>Subgroups</h2>" in page
    for name in ("pearson", "spearman"):
        assert f'alt="subgroups-{name}-default"' in page


def test_metric_correlations_match_an_independent_computation(run: fluency.RunResult, page: str) -> None:
    metrics = pd.read_parquet(run.path / "metrics.parquet")
    found = metric_correlations(metrics, "default")
    per_layer = metrics[metrics.layer.notna()]
    layers = sorted(k for k, v in per_layer.groupby("layer").metric.nunique().items() if v >= 2)
    assert "all" not in layers  # only gini has the all-layers value: nothing to correlate
    assert set(found) == {*layers, "(whole)"}  # the image-stats covariates are whole-image metrics
    for layer in layers:
        rows = per_layer[per_layer.layer == layer]
        names = sorted(set(rows.metric))
        assert sorted(found[layer].columns) == names
        values = {m: rows[rows.metric == m].set_index("image_id")["value"] for m in names}
        for a, b in combinations(names, 2):
            joined = pd.concat([values[a], values[b]], axis=1, join="inner")
            rho = stats.spearmanr(joined.iloc[:, 0], joined.iloc[:, 1]).statistic
            assert found[layer].loc[a, b] == pytest.approx(rho, abs=1e-12), (layer, a, b)
    assert found["enc3"].loc["gini", "lepsilon"] < 0  # as theory expects on this model
    assert "<h2>Correlations between metrics</h2>" in page and 'alt="metric-correlations-default"' in page
    assert "Gini index (higher = sparser)" in page


def test_metric_correlations_known_answer() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1, 50)
    rows = [("a", a), ("minus", -a), ("square", a ** 2), ("noise", rng.normal(size=50))]
    table_ = pd.DataFrame([{"image_id": f"i{k}", "checkpoint": "c", "metric": m, "layer": "L", "value": v[k]}
                           for m, v in rows for k in range(50)])
    found = metric_correlations(table_, "c")["L"]
    assert found.loc["a", "minus"] == pytest.approx(-1) and found.loc["a", "square"] == pytest.approx(1)
    assert found.loc["a", "noise"] == pytest.approx(stats.spearmanr(a, rows[3][1]).statistic)


class _Store:
    """The two members of an activation store that the histograms read."""
    layers = ["enc1", "enc2", "enc3"]

    def iter_batches(self, layer: str, size: int) -> Any:
        rng = np.random.default_rng(len(layer))
        yield [f"i{k}" for k in range(40)], np.maximum(rng.normal(size=(40, 4, 5, 5)), 0).astype(np.float16)


def _effects(pairs: int, metrics: int = 3, layers: int = 6) -> pd.DataFrame:
    """A metric × layer table of ``pairs`` checkpoint labels."""
    rng = np.random.default_rng(1)
    labels = [f"ck{a}−ck{b}" for a, b in combinations(range(8), 2)][:pairs]
    return pd.DataFrame([{"checkpoint": c, "metric": f"metric-{m}", "layer": f"enc{k}", "n": 240,
                          "estimate": rng.uniform(-0.4, 0.4), "p_fdr": rng.uniform(0, 0.1), "group": g}
                         for c in labels for m in range(metrics) for k in range(layers)
                         for g in ["all", "sex=f", "sex=m"]])


def test_every_figure_text_is_at_least_10_pixels_at_the_size_shown(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """Decision: text size is checked on the figure objects — points × the saved dpi / 72 ≥ 10 px, which is
    the on-screen size because the report shows every PNG at its natural size."""
    built: dict[str, Any] = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: built.__setitem__(Path(str(
        path if isinstance(path, Path) else path[0])).stem, fig))
    six = _effects(6)
    overall = six[six.group == "all"]
    figures.correlation_heatmap(overall[overall.checkpoint.isin(["ck0−ck1", "ck0−ck2"])], tmp_path / "heatmap.png",
                                "pearson: Pearson r", colour_label="Pearson r")
    figures.correlation_heatmap(overall, tmp_path / "difference.png", "pearson: r_A − r_B", value_range=None,
                                colour_label="r_A − r_B")
    figures.subgroup_heatmap(six[six.checkpoint == "ck0−ck1"], tmp_path / "subgroups.png", "by sex", "Spearman ρ")
    square = pd.DataFrame(np.eye(4), index=list("abcd"), columns=list("abcd"))
    figures.metric_correlation_matrix({"enc1": square, "enc2": square, "(whole)": square.iloc[:2, :2]},
                                      tmp_path / "matrix.png", "metrics")
    x = np.linspace(0, 1, 30)
    figures.scatter(x, 2 * x, tmp_path / "scatter.png", "gini @ enc3", "rating", "default: r = +1.000, p_fdr = 0")
    figures.activation_histograms(_Store(), tmp_path / "histograms.png")
    r2 = pd.DataFrame({"checkpoint": "c", "metric": ["gini", "lepsilon"], "estimate": [0.2, 0.1],
                       "r2_fold_sd": [0.05, 0.04]})
    figures.r2_bars(r2, tmp_path / "r2.png", "CV R²")
    figures.latent_projection(np.random.default_rng(0).normal(size=(20, 2)), tmp_path / "latents.png", "PCA",
                              ("PC1", "PC2"), values=np.arange(20.0), value_label="rating")
    figures.interpolation_strip(torch.rand(3, 8, 8), torch.rand(3, 8, 8), torch.rand(4, 3, 8, 8),
                                [0, 1 / 3, 2 / 3, 1], tmp_path / "interp.png", "interpolation")
    figures.training_curves([{"epoch": e, "loss": 1 / (e + 1), "val_loss": 1.1 / (e + 1)} for e in range(3)],
                            tmp_path / "curves.png")
    assert set(built) == {"heatmap", "difference", "subgroups", "matrix", "scatter", "histograms", "r2", "latents",
                          "interp", "curves"}
    for name, fig in built.items():
        fig.canvas.draw()  # tick labels get their text when drawn
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
        assert texts, name
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() * figures.DPI / 72 < 10]
        assert not small, f"{name}: text under 10 px at {figures.DPI} dpi: {small[:5]}"
    # six checkpoint pairs wrap into rows that fit the page (1400 px) rather than one wide strip
    width = built["difference"].get_size_inches()[0] * figures.DPI
    assert width <= figures.MAX_WIDTH * figures.DPI and len(built["difference"].axes) == 6 + 1
    # colour bars say what the colour means; histogram axes say what is counted
    for name, label in (("heatmap", "Pearson r"), ("difference", "r_A − r_B"), ("subgroups", "Spearman ρ"),
                        ("matrix", "Spearman ρ between metrics")):
        assert built[name].axes[-1].get_ylabel() == label, name
    hist = built["histograms"].axes
    assert {ax.get_ylabel() for ax in hist} == {"units", "images"} and all(ax.get_xlabel() for ax in hist)
    # the subgroup heatmap: one panel per metric, rows = groups with their n, cells = the estimates
    panel = built["subgroups"].axes[0]
    assert [t.get_text() for t in panel.get_yticklabels()] == ["all (n=240)", "sex=f (n=240)", "sex=m (n=240)"]
    first = six[(six.checkpoint == "ck0−ck1") & (six.metric == "metric-0") & (six.group == "all")].iloc[0]
    assert panel.texts[0].get_text().rstrip("*") == f"{first.estimate:.2f}"
    for fig in built.values():
        fig.clf()


def test_report_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(FluencyError, match="not a fluency run folder"):
        build_report(tmp_path)
