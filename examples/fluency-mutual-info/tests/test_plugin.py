"""The plugins through their specs, on hand-built batches and tables (no model, no entry point)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fluency.api import RESULT_COLUMNS, AnalysisData, FluencyError, MetricBatch, get_plugin_manager

from fluency_mutual_info import plugin


def metric(name: str, **options: Any):
    """The metric built as fluency builds it: spec → validated options → factory(**options)."""
    spec = {s.name: s for s in plugin.fluency_register_metrics()}[name]
    return spec.load()(**spec.resolve(options))


def analysis(**options: Any):
    spec = plugin.fluency_register_analyses()[0]
    return spec.load()(**spec.resolve(options))


def stimuli(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """n images 3×8×8 driven by 3 latent factors, a layer that is a nonlinear function of them and a layer of
    independent noise."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 3, generator=g) @ torch.randn(3, 3 * 8 * 8, generator=g)
    images = torch.sigmoid(factors + 0.1 * torch.randn(n, 3 * 8 * 8, generator=g)).view(n, 3, 8, 8)
    weight = torch.randn(6, 3, 3, 3, generator=g)
    enc1 = torch.relu(torch.nn.functional.conv2d(images - 0.5, weight, padding=1))
    noise = torch.randn(n, 4, 4, 4, generator=g)
    return [f"img-{i:03d}" for i in range(n)], images, {"enc1": enc1, "noise": noise}


def run_metric(m: Any, ids: list[str], images: torch.Tensor, acts: dict[str, torch.Tensor], batch_size: int,
               seed: int = 0) -> dict[str, pd.Series]:
    """Feed batches, then collect compute() and finish() values as {layer: Series indexed by image id}."""
    out: dict[str, list[pd.Series]] = {}
    for start in range(0, len(ids), batch_size):
        part = slice(start, start + batch_size)
        batch = MetricBatch(ids[part], images[part], {k: v[part] for k, v in acts.items()}, seed=seed)
        for values in m.compute(batch):
            out.setdefault(values.layer, []).append(pd.Series(values.as_numpy(), index=ids[part]))
    for pair_ids, values in m.finish():
        out.setdefault(values.layer, []).append(pd.Series(values.as_numpy(), index=list(pair_ids)))
    return {layer: pd.concat(parts) for layer, parts in out.items()}


def test_activation_entropy_one_value_per_image_and_layer() -> None:
    ids, images, acts = stimuli(10)
    values = run_metric(metric("activation-entropy", bins=16), ids, images, acts, batch_size=4)
    assert set(values) == {"enc1", "noise"}
    for series in values.values():
        assert list(series.index) == ids and np.all((series >= 0) & (series <= 4))
    only = run_metric(metric("activation-entropy", layers=["noise"], correction="miller-madow"), ids, images, acts, 4)
    assert set(only) == {"noise"} and np.all(only["noise"] > values["noise"])


def test_activation_entropy_same_for_channels_last() -> None:
    ids, images, acts = stimuli(5)
    channels_last = {k: v.contiguous(memory_format=torch.channels_last) for k, v in acts.items()}
    a = run_metric(metric("activation-entropy"), ids, images, acts, 5)
    b = run_metric(metric("activation-entropy"), ids, images, channels_last, 5)
    for layer in a:
        np.testing.assert_array_equal(a[layer].to_numpy(), b[layer].to_numpy())


def test_options_are_validated() -> None:
    with pytest.raises(FluencyError):
        metric("activation-entropy", bins=1)
    with pytest.raises(FluencyError):
        metric("mutual-info", estimator="histogram")


@pytest.mark.parametrize("estimator", ["gaussian", "ksg"])
def test_pointwise_mi_independent_of_batch_size(estimator: str) -> None:
    ids, images, acts = stimuli(21)
    options = {"dims": 4, "project": 16, "estimator": estimator}
    one = run_metric(metric("mutual-info", **options), ids, images, acts, batch_size=1)
    seven = run_metric(metric("mutual-info", **options), ids, images, acts, batch_size=7)
    assert set(one) == {"enc1", "noise"}
    for layer in one:
        assert list(one[layer].index) == ids and np.isfinite(one[layer]).all()
        np.testing.assert_allclose(one[layer].to_numpy(), seven[layer].to_numpy(), rtol=1e-9, atol=1e-9)
    channels_last = {k: v.contiguous(memory_format=torch.channels_last) for k, v in acts.items()}
    same = run_metric(metric("mutual-info", **options), ids, images, channels_last, batch_size=7)
    np.testing.assert_allclose(same["enc1"].to_numpy(), seven["enc1"].to_numpy(), rtol=1e-9, atol=1e-9)


def test_pointwise_mi_depends_on_the_run_seed_only_through_the_projection() -> None:
    ids, images, acts = stimuli(21)
    a = run_metric(metric("mutual-info", dims=4, project=16), ids, images, acts, 7, seed=0)
    b = run_metric(metric("mutual-info", dims=4, project=16), ids, images, acts, 7, seed=1)
    assert not np.allclose(a["enc1"].to_numpy(), b["enc1"].to_numpy())


def test_pointwise_mi_is_higher_for_an_informative_layer() -> None:
    ids, images, acts = stimuli(300, seed=3)
    values = run_metric(metric("mutual-info", dims=3, project=32), ids, images, acts, 32)
    informative, noise = values["enc1"].mean(), values["noise"].mean()
    assert informative > 1.0  # bits
    assert abs(noise) < 0.1  # bias of the Gaussian estimator for independence: 3·3/(2·300·ln 2) ≈ 0.02 bits


def test_pointwise_mi_refuses_too_few_images_and_missing_images() -> None:
    ids, images, acts = stimuli(17)
    with pytest.raises(FluencyError, match="17 images are too few for dims=8 .need at least 18"):
        run_metric(metric("mutual-info"), ids, images, acts, 8)
    with pytest.raises(FluencyError, match="needs the images"):
        metric("mutual-info").compute(MetricBatch(ids, None, acts, seed=0))


def metrics_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    ids = [f"img-{i}" for i in range(40)]
    frames = [pd.DataFrame({"image_id": ids, "checkpoint": ckpt, "metric": name, "layer": layer,
                            "value": rng.normal(shift, 1.0, len(ids))})
              for ckpt in ("a", "b") for layer in ("enc1", "enc2")
              for name, shift in (("mutual-info", 1.5), ("gini", 0.3))]
    return pd.concat(frames, ignore_index=True)


def ratings(seed: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"img-{i}" for i in range(40)],
                         "rating": np.random.default_rng(seed).normal(4, 1, 40)})


def test_layer_mi_is_the_mean_with_a_bootstrap_interval() -> None:
    table = metrics_table()
    result = analysis(n_boot=500).run(AnalysisData(table, ratings(0), "rating"))
    assert list(result.columns) == [*RESULT_COLUMNS, "ci_low", "ci_high"]
    assert len(result) == 4 and set(result["analysis"]) == {"layer-mi"} and set(result["statistic"]) == {"mi_bits"}
    assert result["p"].isna().all() and (result["n"] == 40).all()
    for row in result.itertuples():
        rows = table[(table["metric"] == "mutual-info") & (table["checkpoint"] == row.checkpoint)
                     & (table["layer"] == row.layer)]
        assert row.estimate == pytest.approx(rows["value"].mean(), abs=1e-12)
        assert row.ci_low < row.estimate < row.ci_high
        assert row.ci_high - row.ci_low == pytest.approx(2 * 1.96 * rows["value"].std() / math.sqrt(40), rel=0.3)


def test_layer_mi_ignores_the_ratings() -> None:
    table = metrics_table()
    shuffled = ratings(0).assign(rating=lambda r: r["rating"].sample(frac=1, random_state=1).to_numpy())
    a = analysis().run(AnalysisData(table, ratings(0), "rating"))
    b = analysis().run(AnalysisData(table, shuffled, "rating"))
    c = analysis().run(AnalysisData(table, ratings(7), "rating"))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)


def test_layer_mi_without_pointwise_rows_is_empty() -> None:
    table = metrics_table()
    result = analysis().run(AnalysisData(table[table["metric"] != "mutual-info"], ratings(0), "rating"))
    assert result.empty and list(result.columns) == [*RESULT_COLUMNS, "ci_low", "ci_high"]


def test_registers_through_the_plugin_manager() -> None:
    manager = get_plugin_manager()
    try:
        manager.get("metric", "mutual-info")  # installed: loaded from the entry point already
    except FluencyError:
        manager.register(plugin, "mutual-info-test", "fluency-mutual-info", "0.1.0")
    assert manager.get("metric", "activation-entropy").higher_is_more_fluent is False
    spec = manager.get("metric", "mutual-info")
    assert spec.needs == "images" and spec.reads_activations and spec.higher_is_more_fluent is None
    assert manager.get("analysis", "layer-mi").resolve({})["n_boot"] == 2000
