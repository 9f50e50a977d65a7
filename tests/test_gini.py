"""Gini index: REFERENCE.md known answers, an independent formula, and Hurley & Rickard's six properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fluency.core.errors import FluencyError
from fluency.core.metric import MetricBatch
from fluency.plugins.default_gini import Gini, gini_numpy, gini_torch


def g(values, negative: str = "abs") -> float:
    return float(gini_numpy(np.asarray([values], dtype=np.float64), negative)[0])


def mean_abs_difference(c: np.ndarray) -> float:
    """Σ_i Σ_j |c_i − c_j| / (2 N² mean(c)): the textbook formula, independent of the sorted one."""
    c = np.abs(c.astype(np.float64))
    return 0.0 if c.sum() == 0 else float(np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) ** 2 * c.mean()))


@pytest.mark.parametrize("values, expected", [
    ([3, 3, 3, 3], 0.0),
    ([0, 0, 0, 1], 0.75),
    ([1, 2, 3, 4], 0.25),
    ([0, 0, 1, 1], 0.5),
    ([-1, 0, 1], 1 / 3),
    ([0, 0, 0], 0.0),
])
def test_known_answers(values, expected) -> None:
    assert g(values) == pytest.approx(expected, abs=1e-12)


def test_one_hot_of_length_1000_is_exactly_0999_not_gini_py() -> None:
    x = np.zeros(1000)
    x[17] = 5.0
    assert g(x) == pytest.approx(0.999, abs=1e-12)  # gini.py's +1e-7 would give 0.99890


def test_shift_variant_reproduces_gini_py_on_negative_input() -> None:
    assert g([-1, 0, 1], "shift") == pytest.approx(4 / 9, abs=1e-12)
    assert g([1, 2, 3, 4], "shift") == pytest.approx(0.25)  # no negatives: unchanged


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 60), elements=st.floats(-100, 100, allow_nan=False, width=32)))
def test_agrees_with_mean_absolute_difference(x) -> None:
    assert g(x) == pytest.approx(mean_abs_difference(x), abs=1e-9)


def test_cpu_and_device_paths_agree() -> None:
    x = torch.randn(6, 5000, dtype=torch.float64)
    x[2] = 0
    assert np.allclose(gini_numpy(x.numpy()), gini_torch(x).numpy(), atol=1e-12)
    assert np.allclose(gini_numpy(x.numpy(), "shift"), gini_torch(x, "shift").numpy(), atol=1e-12)


nonneg = arrays(np.float64, st.integers(2, 40), elements=st.floats(0, 100, allow_nan=False, width=32))


def non_constant(c: np.ndarray) -> bool:
    return c.sum() > 1e-3 and np.ptp(c) > 1e-3


@settings(max_examples=80, deadline=None)
@given(nonneg, st.data())
def test_robin_hood(c, data) -> None:
    """Moving mass from a larger to a smaller entry (without swapping their order) lowers sparsity."""
    assume(non_constant(c))
    i, j = int(np.argmax(c)), int(np.argmin(c))
    gap = c[i] - c[j]
    alpha = data.draw(st.floats(0.05, 0.45)) * gap
    moved = c.copy()
    moved[i] -= alpha
    moved[j] += alpha
    assert g(moved) < g(c)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.floats(0.01, 1000))
def test_scaling(c, alpha) -> None:
    assert g(alpha * c) == pytest.approx(g(c), abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.floats(0.1, 100))
def test_rising_tide(c, alpha) -> None:
    assume(non_constant(c))
    assert g(c + alpha) < g(c)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.integers(2, 4))
def test_cloning(c, k) -> None:
    assert g(np.tile(c, k)) == pytest.approx(g(c), abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(nonneg)
def test_bill_gates(c) -> None:
    """Growing one entry enough raises sparsity (here: making it dominate the total).

    Strict only when at least two entries are non-zero: a one-hot vector is already as sparse as it gets.
    """
    assume((c > 1e-3).sum() >= 2)
    grown = c.copy()
    i = int(np.argmax(c))
    grown[i] += 10 * c.sum() * len(c)
    assert g(grown) > g(c)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.integers(1, 20))
def test_babies(c, zeros) -> None:
    assume(c.sum() > 1e-3)
    assert g(np.concatenate([c, np.zeros(zeros)])) > g(c)


def test_metric_per_layer_and_all_layers() -> None:
    acts = {"enc1": torch.rand(3, 2, 4, 4), "enc2": torch.rand(3, 8)}
    acts["enc2"][1] = 0
    batch = MetricBatch(["a", "b", "c"], torch.zeros(3, 3, 8, 8), acts)
    values = {v.layer: v.as_numpy() for v in Gini(layers=["enc1", "enc2"]).compute(batch)}
    assert set(values) == {"enc1", "enc2", "all"}
    assert values["enc2"][1] == 0.0
    both = torch.cat([acts["enc1"].flatten(1), acts["enc2"]], dim=1).numpy()
    assert np.allclose(values["all"], [mean_abs_difference(row) for row in both])
    only = Gini(layers=["enc1", "enc2"], all_layers=False).compute(batch)
    assert {v.layer for v in only} == {"enc1", "enc2"}


def test_nan_activations_name_the_layer() -> None:
    acts = {"enc1": torch.rand(2, 10)}
    acts["enc1"][1, 3] = float("nan")
    with pytest.raises(FluencyError, match="NaN/Inf activations found in layer 'enc1'"):
        Gini(layers=["enc1"]).compute(MetricBatch(["a", "b"], torch.zeros(2, 3, 4, 4), acts))
