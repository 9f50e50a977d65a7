"""Per-channel values and the weighting of the "all layers" value of gini, hoyer and lepsilon.

Every expectation is computed independently: brute-force mean absolute differences for the
Gini index, the Hoyer formula written out, plain counts for lepsilon.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluency.core.errors import FluencyError
from fluency.core.plugin.metric import MetricBatch
from fluency.plugins.default_gini import Gini
from fluency.plugins.default_hoyer import Hoyer
from fluency.plugins.default_lepsilon import LEpsilon


def brute_gini(v: np.ndarray) -> float:
    """Σ_i Σ_j |c_i − c_j| / (2 N² mean(c)) of |v|."""
    c = np.abs(np.asarray(v, dtype=np.float64).ravel())
    return 0.0 if c.sum() == 0 else float(np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) ** 2 * c.mean()))


def plain_hoyer(v: np.ndarray) -> float:
    v = np.abs(np.asarray(v, dtype=np.float64).ravel())
    n = len(v)
    return 0.0 if not v.any() else float((np.sqrt(n) - v.sum() / np.sqrt((v ** 2).sum())) / (np.sqrt(n) - 1))


@pytest.fixture
def batch() -> MetricBatch:
    gen = torch.Generator().manual_seed(3)
    acts = {"enc1": torch.relu(torch.randn(3, 4, 5, 5, generator=gen)),      # 100 units, 4 channels
            "enc2": torch.relu(torch.randn(3, 2, 3, 3, generator=gen) - 0.5),  # 18 units, 2 channels
            "latent": torch.randn(3, 6, generator=gen)}                       # signed, not convolutional
    acts["enc1"][1, 2] = 0.0  # an all-zero feature map: its Gini is 0 by convention
    return MetricBatch(["a", "b", "c"], torch.zeros(3, 3, 8, 8), acts)


def values(out, metric: str = "gini") -> dict[str | None, np.ndarray]:
    return {v.layer: v.as_numpy() for v in out if v.metric == metric}


def test_gini_per_channel_is_the_mean_of_each_feature_maps_gini(batch) -> None:
    got = values(Gini(layers=["enc1", "enc2"], per="channel", all_layers=False).compute(batch))
    for layer in ("enc1", "enc2"):
        a = batch.activations[layer].numpy()
        expected = [np.mean([brute_gini(a[i, c]) for c in range(a.shape[1])]) for i in range(3)]
        assert got[layer] == pytest.approx(expected, abs=1e-12)
    whole = values(Gini(layers=["enc1"]).compute(batch))["enc1"]
    assert not np.allclose(whole, got["enc1"])  # a different question, a different number


def test_gini_per_channel_shift_path_agrees_with_brute_force(batch) -> None:
    got = values(Gini(layers=["enc1"], per="channel", negative="abs").compute(batch))["enc1"]
    via_dense = values(Gini(layers=["enc1"], per="channel", negative="shift").compute(batch))["enc1"]
    assert got == pytest.approx(via_dense, abs=1e-12)  # ReLU maps: nothing to shift, the dense path agrees


@pytest.mark.parametrize("per", ["image", "channel"])
def test_gini_all_layers_weighting(batch, per) -> None:
    layers = ["enc1", "enc2"]
    per_layer = values(Gini(layers=layers, per=per, all_layers=False).compute(batch))
    units = values(Gini(layers=layers, per=per).compute(batch))["all"]
    equal = values(Gini(layers=layers, per=per, layer_weighting="equal").compute(batch))["all"]
    custom = values(Gini(layers=layers, per=per, layer_weights=[3.0, 1.0]).compute(batch))["all"]
    if per == "image":
        a = [np.concatenate([batch.activations[n][i].numpy().ravel() for n in layers]) for i in range(3)]
        assert units == pytest.approx([brute_gini(v) for v in a], abs=1e-12)
    else:  # every channel of every layer counts once: 4 channels of enc1, 2 of enc2
        assert units == pytest.approx((4 * per_layer["enc1"] + 2 * per_layer["enc2"]) / 6, abs=1e-12)
    assert equal == pytest.approx((per_layer["enc1"] + per_layer["enc2"]) / 2, abs=1e-12)
    assert custom == pytest.approx((3 * per_layer["enc1"] + per_layer["enc2"]) / 4, abs=1e-12)
    assert not np.allclose(units, equal)


def test_layer_weights_are_checked(batch) -> None:
    with pytest.raises(FluencyError, match=r"layer_weights has 1 values for the 2 layers \['enc1', 'enc2'\]"):
        Gini(layers=["enc1", "enc2"], layer_weights=[1.0]).compute(batch)
    with pytest.raises(FluencyError, match="must be finite, >= 0 and not all 0"):
        Hoyer(layers=["enc1", "enc2"], all_layers=True, layer_weights=[0.0, 0.0]).compute(batch)


def test_per_channel_needs_a_convolutional_layer(batch) -> None:
    with pytest.raises(FluencyError, match=r"per='channel' needs a convolutional layer .*\(3, 6\)"):
        Gini(layers=["latent"], per="channel").compute(batch)


def test_hoyer_all_layers(batch) -> None:
    layers = ["enc1", "enc2", "latent"]
    per_layer = values(Hoyer(layers=layers).compute(batch), "hoyer")
    assert "all" not in per_layer  # off by default for hoyer
    units = values(Hoyer(layers=layers, all_layers=True).compute(batch), "hoyer")["all"]
    a = [np.concatenate([batch.activations[n][i].numpy().ravel() for n in layers]) for i in range(3)]
    assert units == pytest.approx([plain_hoyer(v) for v in a], abs=1e-12)
    equal = values(Hoyer(layers=layers, all_layers=True, layer_weighting="equal").compute(batch), "hoyer")["all"]
    assert equal == pytest.approx(sum(per_layer[n] for n in layers) / 3, abs=1e-12)
    for layer in layers:
        v = batch.activations[layer].numpy()
        assert per_layer[layer] == pytest.approx([plain_hoyer(v[i]) for i in range(3)], abs=1e-12)


def test_lepsilon_all_layers(batch) -> None:
    layers = ["enc1", "enc2", "latent"]
    out = LEpsilon(layers=layers, epsilon=0.1, all_layers=True).compute(batch)
    counts, fractions = values(out, "lepsilon"), values(out, "lepsilon-fraction")
    a = [np.concatenate([batch.activations[n][i].numpy().ravel() for n in layers]) for i in range(3)]
    assert counts["all"].tolist() == [float((np.abs(v) > 0.1).sum()) for v in a]
    assert fractions["all"] == pytest.approx([(np.abs(v) > 0.1).mean() for v in a])
    equal = values(LEpsilon(layers=layers, epsilon=0.1, all_layers=True, layer_weighting="equal").compute(batch),
                   "lepsilon-fraction")["all"]
    assert equal == pytest.approx(sum(fractions[n] for n in layers) / 3)
    assert not np.allclose(equal, fractions["all"])


@pytest.mark.parametrize("per", ["image", "channel"])
def test_gini_tensor_branch_used_on_a_gpu_agrees(batch, per, monkeypatch) -> None:
    """On a GPU the rows stay tensors (sorted with torch.sort); force that branch on the CPU."""
    from fluency.plugins import default_gini

    layers = ["enc1", "enc2"]
    expected = values(Gini(layers=layers, per=per).compute(batch))
    monkeypatch.setattr(default_gini.Gini, "_rows", staticmethod(lambda t: t.detach().flatten(1)))
    monkeypatch.setattr(default_gini, "gini", lambda x, negative="abs", threads=None: default_gini._gini_torch(
        torch.as_tensor(x), negative))
    got = values(Gini(layers=layers, per=per).compute(batch))
    assert set(got) == set(expected) == {"enc1", "enc2", "all"}
    for layer in got:
        assert got[layer] == pytest.approx(expected[layer], abs=1e-12)


def test_units_as_rows_is_a_view_of_a_channels_last_layer() -> None:
    from fluency import units_as_rows

    x = torch.randn(3, 4, 5, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    rows = units_as_rows(cl)
    assert rows.shape == (3, 120) and rows.data_ptr() == cl.data_ptr()  # no copy
    for i in range(3):  # the same units per image, in another order
        assert torch.equal(rows[i].sort().values, x[i].flatten().sort().values)
    assert torch.equal(units_as_rows(x), x.flatten(1))
    assert torch.equal(units_as_rows(torch.ones(2, 7)), torch.ones(2, 7))


def test_metrics_agree_on_channels_last_and_contiguous_activations(batch) -> None:
    layers = ["enc1", "enc2"]
    last = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v)
            for k, v in batch.activations.items()}
    other = MetricBatch(batch.image_ids, batch.images, last)
    for metric in (Gini(layers=layers), Gini(layers=layers, per="channel"), Hoyer(layers=layers, all_layers=True),
                   LEpsilon(layers=layers, all_layers=True)):
        a, b = metric.compute(batch), metric.compute(other)
        assert [(v.metric, v.layer) for v in a] == [(v.metric, v.layer) for v in b]
        for u, v in zip(a, b):
            assert u.as_numpy() == pytest.approx(v.as_numpy(), abs=1e-12)
