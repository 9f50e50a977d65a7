"""L-epsilon: counts and fractions of active units, absolute and relative thresholds, the metric, registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluency.core.errors import FluencyError
from fluency.core.plugin.metric import MetricBatch
from fluency.plugins import default_lepsilon
from fluency.plugins.default_lepsilon import LEpsilon, active_count, _count_torch

#: |X| row 0 = [0, 0.005, 0.02, 0.5, 3, 0.01, 0.2, 0.04]; row 1 all zero
X = torch.tensor([[0.0, 0.005, -0.02, 0.5, -3.0, 0.01, 0.2, -0.04],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])


def test_absolute_threshold_counts_by_magnitude() -> None:
    assert active_count(X, 0.01).tolist() == [5, 0]  # -0.02, 0.5, -3, 0.2, -0.04 (0.01 itself is not > 0.01)
    assert active_count(X, 0.0).tolist() == [7, 0]  # every non-zero
    assert active_count(X, 0.1).tolist() == [3, 0]  # 0.5, -3, 0.2
    assert active_count(X, 10.0).tolist() == [0, 0]
    assert active_count(-X, 0.01).tolist() == [5, 0]  # the sign does not matter


def test_relative_threshold_is_a_fraction_of_the_images_max() -> None:
    assert active_count(X, 0.1, "relative").tolist() == [2, 0]  # > 0.1 · 3 = 0.3: 0.5 and -3
    assert active_count(X, 0.05, "relative").tolist() == [3, 0]  # > 0.15: 0.5, -3, 0.2
    assert active_count(X, 0.0, "relative").tolist() == [7, 0]
    assert active_count(X, 1.0, "relative").tolist() == [0, 0]  # nothing is above its own max
    assert active_count(X * 1000, 0.05, "relative").tolist() == [3, 0]  # scale invariant
    assert active_count(X * 1000, 0.01).tolist() == [7, 0]  # the absolute one is not


def test_relative_threshold_is_per_row() -> None:
    x = torch.tensor([[1.0, 2.0, 10.0], [1.0, 2.0, 3.0]])
    assert active_count(x, 0.5, "relative").tolist() == [1, 2]  # > 5 and > 1.5


def test_numpy_input_and_bad_arguments() -> None:
    assert active_count(X.numpy(), 0.01).tolist() == [5, 0]
    with pytest.raises(ValueError, match="mode"):
        active_count(X, 0.1, "percentile")
    with pytest.raises(ValueError, match=">= 0"):
        active_count(X, -0.1)
    with pytest.raises(ValueError, match="NaN/Inf"):
        active_count(torch.tensor([[1.0, float("inf")]]), 0.1)


def test_metric_reports_count_and_fraction_per_layer_on_bchw_activations() -> None:
    acts = {"enc1": X.reshape(2, 2, 2, 2), "enc2": torch.ones(2, 3, 2, 2), "enc3": torch.randn(2, 5)}
    acts["enc2"][1, 0] = 0.001  # 4 of 12 units at 0.001: below ε
    batch = MetricBatch(["a", "b"], torch.zeros(2, 3, 4, 4), acts)
    out = LEpsilon(epsilon=0.01, layers=["enc1", "enc2"]).compute(batch)
    assert [(v.metric, v.layer) for v in out] == [("lepsilon", "enc1"), ("lepsilon-fraction", "enc1"),
                                                  ("lepsilon", "enc2"), ("lepsilon-fraction", "enc2")]
    values = {(v.metric, v.layer): v.as_numpy() for v in out}
    assert all(v.shape == (2,) for v in values.values())
    assert np.array_equal(values[("lepsilon", "enc1")], [5, 0])
    assert np.allclose(values[("lepsilon-fraction", "enc1")], [5 / 8, 0])
    assert np.array_equal(values[("lepsilon", "enc2")], [12, 8])
    assert np.allclose(values[("lepsilon-fraction", "enc2")], [1, 8 / 12])
    relative = {(v.metric, v.layer): v.as_numpy()
                for v in LEpsilon(epsilon=0.05, mode="relative", layers=["enc1"]).compute(batch)}
    assert np.array_equal(relative[("lepsilon", "enc1")], [3, 0])
    assert np.allclose(relative[("lepsilon-fraction", "enc1")], [3 / 8, 0])


def test_metric_defaults_and_no_layers_option() -> None:
    batch = MetricBatch(["a", "b"], torch.zeros(2, 3, 4, 4), {"enc1": X.reshape(2, 1, 2, 4)})
    values = {v.metric: v.as_numpy() for v in LEpsilon().compute(batch)}  # ε = 0.01, absolute, every layer
    assert np.array_equal(values["lepsilon"], [5, 0])
    with pytest.raises(FluencyError, match="mode"):
        LEpsilon(mode="percentile")
    with pytest.raises(FluencyError, match="epsilon"):
        LEpsilon(epsilon=-1.0)
    with pytest.raises(FluencyError, match="enc9"):
        LEpsilon(layers=["enc9"]).compute(batch)


def test_nan_is_an_error_naming_the_layer_and_image() -> None:
    acts = {"enc1": torch.rand(2, 4), "enc2": torch.tensor([[1.0, 2.0], [float("nan"), 1.0]])}
    with pytest.raises(FluencyError, match=r"NaN/Inf activations found .*in layer 'enc2' for images \['b'\]"):
        LEpsilon(epsilon=0.1, layers=["enc1", "enc2"]).compute(MetricBatch(["a", "b"], torch.zeros(2, 3, 2, 2), acts))


def test_registered_through_the_plugin_manager() -> None:
    from fluency.core.plugin.manager import PluginManager

    spec = PluginManager(autoload=False).get("metric", "lepsilon")
    assert spec.factory == "fluency.plugins.default_lepsilon:LEpsilon" and spec.load() is LEpsilon
    assert spec.needs == "activations" and spec.higher_is_more_fluent is False
    assert spec.resolve() == {"epsilon": 0.01, "mode": "absolute", "layers": None, "all_layers": False,
                              "layer_weighting": "units", "layer_weights": None}
    with pytest.raises(FluencyError):
        spec.resolve({"epsilon": -0.5})
    with pytest.raises(FluencyError):
        spec.resolve({"mode": "percentile"})
    (direct,) = default_lepsilon.fluency_register_metrics()
    direct.check()
    assert direct.name == "lepsilon"


@pytest.mark.parametrize("mode", ["absolute", "relative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_numpy_path_equals_the_device_path(mode, dtype) -> None:
    """The CPU counts with numpy; the GPU path (torch ops, forced here on a CPU tensor) must agree exactly,
    values sitting exactly at ±threshold included."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 500, generator=gen, dtype=dtype).mul(0.05)
    x[0, :10] = 0.01  # exactly at the absolute threshold: not counted
    x[1, :10] = -0.01
    x[2] = 0.0
    x[3, 0] = 2.0  # relative threshold 0.02 for this row
    x[3, 1:5] = torch.tensor(2.0, dtype=dtype) * torch.tensor(0.01, dtype=dtype)
    cpu = active_count(x, 0.01, mode)
    device = _count_torch(x, 0.01, mode)
    assert cpu.dtype == torch.int64 and torch.equal(cpu, device)
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        y = x.clone()
        y[4, 3] = float("nan")
        active_count(y, 0.01, mode)


def test_finite_rows_whose_sum_overflows_are_not_called_non_finite() -> None:
    x = torch.full((2, 4), 3e38, dtype=torch.float32)  # the float32 row sum overflows to inf
    assert active_count(x, 0.01).tolist() == [4, 4]
