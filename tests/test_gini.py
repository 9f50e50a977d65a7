"""Gini index: REFERENCE.md known answers, independent formulas, Hurley & Rickard's six properties, the metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fluency.core.errors import FluencyError
from fluency.core.plugin.metric import MetricBatch
from fluency.plugins import default_gini
from fluency.plugins.default_gini import Gini, NonFiniteError, _gini_numpy, _gini_torch, gini


def g(values, negative: str = "abs") -> float:
    """Gini of one vector through the public function (numpy path)."""
    out = gini(np.asarray([values], dtype=np.float64), negative)
    assert isinstance(out, np.ndarray) and out.shape == (1,) and out.dtype == np.float64
    return float(out[0])


def mean_abs_difference(c: np.ndarray) -> float:
    """Σ_i Σ_j |c_i − c_j| / (2 N² mean(c)) by brute force: independent of the sorted closed form."""
    c = np.abs(np.asarray(c, dtype=np.float64))
    return 0.0 if c.sum() == 0 else float(np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) ** 2 * c.mean()))


def gini_py(x: np.ndarray) -> float:
    """oliviaguest/gini's ``gini.py`` without its ``+= 0.0000001``: shift by a negative minimum, then its formula."""
    a = np.sort(np.asarray(x, dtype=np.float64).ravel())
    if a.min() < 0:
        a = a - a.min()
    n = len(a)
    index = np.arange(1, n + 1)
    return float(np.sum((2 * index - n - 1) * a) / (n * np.sum(a)))


# -- known answers (REFERENCE.md) ---------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ([3, 3, 3, 3], 0.0),
    ([0.2] * 1000, 0.0),
    ([0, 0, 0, 1], 0.75),
    ([0, 7, 0, 0], 0.75),  # position does not matter
    ([1, 2, 3, 4], 0.25),
    ([4, 1, 3, 2], 0.25),
    ([0, 0, 1, 1], 0.5),
    ([-1, 0, 1], 1 / 3),
    ([-1, -2, -3, -4], 0.25),  # abs: the sign does not matter
    ([0, 0, 0], 0.0),
    ([0.0], 0.0),
    ([5.0], 0.0),
])
def test_known_answers(values, expected) -> None:
    assert g(values) == pytest.approx(expected, abs=1e-12)


def test_one_hot_is_one_minus_one_over_n_exactly() -> None:
    x = np.zeros(1000)
    x[17] = 5.0
    assert g(x) == pytest.approx(0.999, abs=1e-12)
    assert abs(g(x) - 0.99890) > 5e-5  # gini.py's +1e-7 per element gives 0.99890: we must not
    for n in (2, 4, 10, 65536):
        one_hot = np.zeros(n, dtype=np.float32)
        one_hot[n // 3] = 0.3
        assert g(one_hot) == pytest.approx(1 - 1 / n, abs=1e-12)


def test_shift_variant_reproduces_gini_py_on_negative_input() -> None:
    assert g([-1, 0, 1], "shift") == pytest.approx(4 / 9, abs=1e-12)  # 0.444..., vs 1/3 with abs
    assert g([-1, 0, 1], "abs") == pytest.approx(1 / 3, abs=1e-12)
    assert g([1, 2, 3, 4], "shift") == pytest.approx(0.25, abs=1e-12)  # no negatives: unchanged
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 1.0, size=(5, 300))
    assert np.allclose(gini(x, "shift"), [gini_py(row) for row in x], atol=1e-12)


def test_bad_negative_option_and_shape_are_errors() -> None:
    with pytest.raises(ValueError, match="negative"):
        gini(np.ones((1, 3)), "clip")
    with pytest.raises(ValueError, match="B×N"):
        gini(np.ones(3))


def test_float64_accumulation_on_float32_input() -> None:
    rng = np.random.default_rng(0)
    x = rng.exponential(size=(3, 200_000)).astype(np.float32)
    assert np.allclose(gini(x), gini(x.astype(np.float64)), rtol=0, atol=1e-12)


# -- agreement with independent implementations --------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 60), elements=st.floats(-100, 100, allow_nan=False, width=32)))
def test_agrees_with_mean_absolute_difference(x) -> None:
    assert g(x) == pytest.approx(mean_abs_difference(x), abs=1e-9)


def test_agrees_with_mean_absolute_difference_on_random_batches() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(3, 1500)), np.maximum(rng.normal(size=(3, 1500)), 0),
                        rng.pareto(1.5, size=(2, 1500))]).astype(np.float32)
    assert np.allclose(gini(x), [mean_abs_difference(row) for row in x], atol=1e-9)


def test_numpy_and_torch_sort_paths_agree() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(7, 5000)).astype(np.float32))
    x[2] = 0  # zero row → 0 on both paths
    x[4] = 1.5  # constant row
    for negative in ("abs", "shift"):
        cpu = _gini_numpy(x.numpy(), negative)
        forced = _gini_torch(x, negative)  # the GPU path, forced on a CPU tensor
        assert isinstance(forced, torch.Tensor) and forced.dtype == torch.float64
        assert np.allclose(cpu, forced.numpy(), rtol=0, atol=1e-12)
        assert cpu[2] == 0.0 and forced[2].item() == 0.0
    assert isinstance(gini(x), np.ndarray)  # a CPU tensor takes the numpy path


def test_row_chunks_do_not_change_the_result(monkeypatch) -> None:
    x = np.random.default_rng(4).normal(size=(11, 300))
    whole = gini(x)
    monkeypatch.setattr(default_gini, "_CHUNK_VALUES", 700)  # 2 rows per chunk
    assert np.allclose(_gini_numpy(x), whole, rtol=0, atol=1e-14)
    assert np.allclose(_gini_torch(torch.from_numpy(x)).numpy(), whole, atol=1e-12)


@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_instead_of_nan(path, bad) -> None:
    x = np.ones((3, 8), dtype=np.float32)
    x[1, 5] = bad
    fn = _gini_numpy if path == "numpy" else (lambda a, n: _gini_torch(torch.from_numpy(a), n))
    for negative in ("abs", "shift"):
        with pytest.raises(NonFiniteError, match="NaN/Inf activations found") as info:
            fn(x, negative)
        assert info.value.rows == [1] and isinstance(info.value, ValueError)


# -- Hurley & Rickard's six properties ---------------------------------------------------------

nonneg = arrays(np.float64, st.integers(2, 40), elements=st.floats(0, 100, allow_nan=False, width=32))


def non_constant(c: np.ndarray) -> bool:
    return c.sum() > 1e-3 and np.ptp(c) > 1e-3


@settings(max_examples=80, deadline=None)
@given(nonneg, st.data())
def test_robin_hood(c, data) -> None:
    """Taking α from a richer entry and giving it to a poorer one (0 < α < gap/2) lowers sparsity."""
    assume(non_constant(c))
    i, j = data.draw(st.lists(st.integers(0, len(c) - 1), min_size=2, max_size=2, unique=True))
    if c[i] < c[j]:
        i, j = j, i  # i: the richer one
    assume(c[i] - c[j] > 1e-2 * c.max())
    alpha = data.draw(st.floats(0.01, 0.49)) * (c[i] - c[j])
    moved = c.copy()
    moved[i] -= alpha
    moved[j] += alpha
    assert g(moved) < g(c)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.floats(1e-3, 1e3))
def test_scaling(c, alpha) -> None:
    assert g(alpha * c) == pytest.approx(g(c), abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.floats(0.01, 100))
def test_rising_tide(c, alpha) -> None:
    """Adding a constant to every entry of a non-constant vector lowers sparsity."""
    assume(non_constant(c))
    assert g(c + alpha) < g(c)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.integers(2, 4))
def test_cloning(c, k) -> None:
    """S(c) = S(c‖c) = S(c‖c‖c) ..."""
    assert g(np.tile(c, k)) == pytest.approx(g(c), abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.data())
def test_bill_gates(c, data) -> None:
    """Once one entry is large enough (here: the largest), growing it further raises sparsity.

    Strict only when some other entry is non-zero: a one-hot vector stays at 1 − 1/N.
    """
    i = data.draw(st.integers(0, len(c) - 1))
    others = np.delete(c, i)
    assume(others.sum() > 1e-2)
    rich = c.copy()
    rich[i] = c.max() + data.draw(st.floats(0.0, 100.0))  # beta: makes entry i the largest
    richer = rich.copy()
    richer[i] += data.draw(st.floats(0.1, 10.0)) * c.sum()  # alpha > 0
    assert g(richer) > g(rich)


@settings(max_examples=80, deadline=None)
@given(nonneg, st.integers(1, 20))
def test_babies(c, zeros) -> None:
    """Appending zeros (to a non-zero vector) raises sparsity."""
    assume(c.sum() > 1e-3)
    assert g(np.concatenate([c, np.zeros(zeros)])) > g(c)


# -- the metric --------------------------------------------------------------------------------

def test_metric_per_layer_and_all_layers_weighted_by_size() -> None:
    torch.manual_seed(0)
    acts = {"enc1": torch.rand(3, 2, 4, 4), "enc2": torch.randn(3, 8)}
    acts["enc2"][1] = 0
    batch = MetricBatch(["a", "b", "c"], torch.zeros(3, 3, 8, 8), acts)
    out = Gini(layers=["enc1", "enc2"]).compute(batch)
    assert [(v.metric, v.layer) for v in out] == [("gini", "enc1"), ("gini", "enc2"), ("gini", "all")]
    values = {v.layer: v.as_numpy() for v in out}
    assert all(v.shape == (3,) for v in values.values())
    assert values["enc2"][1] == 0.0
    assert np.allclose(values["enc1"], [mean_abs_difference(r) for r in acts["enc1"].flatten(1).numpy()])
    both = torch.cat([acts["enc1"].flatten(1), acts["enc2"]], dim=1).numpy()  # concatenated as is: 32 + 8 units
    assert np.allclose(values["all"], [mean_abs_difference(row) for row in both])
    only = Gini(layers=["enc1", "enc2"], all_layers=False).compute(batch)
    assert [v.layer for v in only] == ["enc1", "enc2"]
    single = Gini(layers=["enc2"]).compute(batch)  # one layer: "all" would only repeat it
    assert [v.layer for v in single] == ["enc2"]


def test_metric_without_layers_option_uses_every_captured_layer_and_shift() -> None:
    acts = {"enc1": torch.tensor([[-1.0, 0.0, 1.0]]), "z": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}
    batch = MetricBatch(["a"], torch.zeros(1, 3, 2, 2), acts)
    values = {v.layer: v.as_numpy()[0] for v in Gini(negative="shift").compute(batch)}
    assert set(values) == {"enc1", "z", "all"}
    assert values["enc1"] == pytest.approx(4 / 9) and values["z"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="negative"):
        Gini(negative="clip")


def test_missing_layer_is_an_error() -> None:
    batch = MetricBatch(["a"], torch.zeros(1, 3, 2, 2), {"enc1": torch.rand(1, 4)})
    with pytest.raises(FluencyError, match="enc9"):
        Gini(layers=["enc9"]).compute(batch)


def test_nan_activations_name_the_layer_and_images() -> None:
    acts = {"enc1": torch.rand(3, 10), "enc2": torch.rand(3, 2, 5)}
    acts["enc2"][1, 0, 3] = float("nan")
    with pytest.raises(FluencyError, match=r"NaN/Inf activations found in layer 'enc2' for images \['b'\]"):
        Gini(layers=["enc1", "enc2"]).compute(MetricBatch(["a", "b", "c"], torch.zeros(3, 3, 4, 4), acts))


# -- registration ------------------------------------------------------------------------------

def test_registered_through_the_plugin_manager() -> None:
    from fluency.core.plugin.manager import PluginManager

    spec = PluginManager(autoload=False).get("metric", "gini")
    assert spec.factory == "fluency.plugins.default_gini:Gini" and spec.load() is Gini
    assert spec.needs == "activations" and spec.higher_is_more_fluent is True
    assert "Hurley & Rickard 2009" in spec.summary
    assert spec.resolve() == {"layers": None, "all_layers": True, "layer_weighting": "units", "layer_weights": None,
                              "per": "image", "negative": "abs"}
    assert spec.resolve({"negative": "shift"})["negative"] == "shift"
    with pytest.raises(FluencyError):
        spec.resolve({"negative": "clip"})


def test_hook_returns_a_valid_spec() -> None:
    (spec,) = default_gini.fluency_register_metrics()
    spec.check()
    assert spec.name == "gini" and spec.load() is Gini


def test_sparse_fast_path_equals_the_dense_one() -> None:
    from fluency.plugins.default_gini import gini, gini_sparse_rows
    gini_numpy = gini

    rng = np.random.default_rng(5)
    layers = [rng.normal(size=(7, n)).astype(np.float32) for n in (300, 50, 9)]
    for layer in layers:
        layer[layer < 0.3] = 0  # ReLU-like, with many exact zeros
        layer[1] *= -1  # and some negative rows
    layers[0][3] = 0  # an all-zero row
    per_layer, merged = gini_sparse_rows(layers, with_all=True)
    for layer, values in zip(layers, per_layer):
        assert np.allclose(values, gini_numpy(layer), atol=1e-12)
    assert np.allclose(merged, gini_numpy(np.concatenate(layers, axis=1)), atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_the_result_or_the_error(threads) -> None:
    from fluency.plugins.default_gini import gini_sparse_rows

    rng = np.random.default_rng(8)
    x = np.maximum(rng.normal(size=(9, 400)), 0).astype(np.float32)
    expected = np.array([mean_abs_difference(row) for row in x])
    assert np.allclose(gini(x, threads=threads), expected, atol=1e-9)
    assert np.allclose(gini(x, "shift", threads=threads), gini(x, "shift", threads=1), rtol=0, atol=0)
    (per_layer,), _ = gini_sparse_rows([x], False, threads=threads)
    assert np.array_equal(per_layer, gini(x, threads=1))
    x[7, 3] = np.nan
    with pytest.raises(NonFiniteError) as info:
        gini(x, threads=threads)
    assert info.value.rows == [7]
