"""L-epsilon: counts and fractions of active units, absolute and relative thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluency.core.errors import FluencyError
from fluency.core.metric import MetricBatch
from fluency.plugins.default_lepsilon import LEpsilon, active_count

X = torch.tensor([[0.0, 0.005, -0.02, 0.5, -3.0, 0.01],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])


def test_absolute_threshold_counts_by_magnitude() -> None:
    assert active_count(X, 0.01).tolist() == [3, 0]  # |x| > 0.01: -0.02, 0.5, -3 (0.01 itself is not > 0.01)
    assert active_count(X, 0.0).tolist() == [5, 0]
    assert active_count(X, 10.0).tolist() == [0, 0]


def test_relative_threshold_is_a_fraction_of_the_images_max() -> None:
    assert active_count(X, 0.1, "relative").tolist() == [2, 0]  # > 0.3: 0.5 and -3
    assert active_count(X * 1000, 0.1, "relative").tolist() == [2, 0]  # scale invariant
    assert active_count(X * 1000, 0.01).tolist() == [5, 0]  # the absolute one is not


def test_metric_reports_count_and_fraction_per_layer() -> None:
    acts = {"enc1": X.reshape(2, 1, 2, 3), "enc2": torch.ones(2, 4)}
    batch = MetricBatch(["a", "b"], torch.zeros(2, 3, 4, 4), acts)
    out = {(v.metric, v.layer): v.as_numpy() for v in LEpsilon(epsilon=0.01, layers=["enc1", "enc2"]).compute(batch)}
    assert np.array_equal(out[("lepsilon", "enc1")], [3, 0])
    assert np.allclose(out[("lepsilon-fraction", "enc1")], [0.5, 0])
    assert np.array_equal(out[("lepsilon", "enc2")], [4, 4])
    assert np.allclose(out[("lepsilon-fraction", "enc2")], [1, 1])


def test_nan_is_an_error_naming_the_layer() -> None:
    acts = {"enc1": torch.tensor([[float("nan"), 1.0]])}
    with pytest.raises(FluencyError, match="layer 'enc1'"):
        LEpsilon(epsilon=0.1, layers=["enc1"]).compute(MetricBatch(["a"], torch.zeros(1, 3, 2, 2), acts))
