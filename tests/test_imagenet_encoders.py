"""``alexnet-imagenet``, ``vgg16-imagenet``, ``vgg19-imagenet``: torchvision's ImageNet CNNs as fixed encoders.

The oracle is torchvision itself (its ``features`` loaded with ``load_state_dict`` from the same file, its
own ``Normalize``) and an independent numpy Hurley–Rickard Gini; fluency's loader, layer naming,
normalisation and ``gini`` metric are what is tested.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fluency.api import FluencyError, MetricBatch, capture_activations
from fluency.core.plugin.manager import PluginManager
from fluency.testing import check_architecture, synthetic_images

torchvision = pytest.importorskip("torchvision")

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
VGG16_FILE = WEIGHTS / "vgg16_imagenet_features.pth"
ALEXNET_FILE = WEIGHTS / "alexnet_imagenet_features.pth"
#: indices in torchvision's ``features`` of each named layer (torchvision's own layout, written out by hand)
VGG16_INDICES = {"conv1": 3, "pool1": 4, "conv2": 8, "pool2": 9, "conv3": 15, "pool3": 16, "conv4": 22, "pool4": 23,
                 "conv5": 29, "pool5": 30}
ALEXNET_INDICES = {"conv1": 1, "pool1": 2, "conv2": 4, "pool2": 5, "conv3": 7, "conv4": 9, "conv5": 11, "pool5": 12}


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager()


def needs(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent (the offline ImageNet weights described in shared/weights/README.md)")
    return path


def hurley_rickard_gini(x: np.ndarray) -> float:
    """G = 1 − 2 Σ_k (c_k/‖c‖₁)((N − k + ½)/N), c = |x| sorted ascending, k = 1..N."""
    c = np.sort(np.abs(x.astype(np.float64).ravel()))
    n = c.size
    k = np.arange(1, n + 1)
    return float(1.0 - 2.0 * np.sum(c / c.sum() * (n - k + 0.5) / n))


def torchvision_layers(builder: str, path: Path, images: torch.Tensor, indices: dict[str, int]) -> dict[str, np.ndarray]:
    """Outputs of torchvision's own ``features`` at ``indices``, with the file's weights and torchvision's
    Normalize."""
    features = getattr(torchvision.models, builder)(weights=None).features.eval()
    state = torch.load(path, map_location="cpu", weights_only=True)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    normalize = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x, out = normalize(images), {}
    wanted = {i: name for name, i in indices.items()}
    with torch.no_grad():
        for i, module in enumerate(features):
            x = module(x)
            if i in wanted:
                out[wanted[i]] = x.clone().numpy()
    return out


def images_64() -> tuple[list[str], torch.Tensor]:
    ids, images = synthetic_images(2, 72, seed=3)
    return ids, images[..., :64]  # 72×64: native keeps the aspect ratio


@pytest.mark.parametrize(("arch", "builder", "path", "indices"), [
    ("vgg16-imagenet", "vgg16", VGG16_FILE, VGG16_INDICES),
    ("alexnet-imagenet", "alexnet", ALEXNET_FILE, ALEXNET_INDICES),
])
def test_layers_equal_torchvision_and_gini_equals_hurley_rickard(manager: PluginManager, arch: str, builder: str,
                                                                 path: Path, indices: dict[str, int]) -> None:
    path = needs(path)
    spec = manager.get("architecture", arch)
    model = spec.load()(**spec.resolve({"size": "native", "weights": str(path)}))
    assert model.kind == "encoder" and not model.provides
    assert list(model.hookable_layers()) == list(indices)  # names, in forward order
    ids, images = images_64()
    layers = list(indices)
    with torch.no_grad(), capture_activations(model, layers) as acts:
        model(images, sample=False)
    expected = torchvision_layers(builder, path, images, indices)
    for name in layers:
        np.testing.assert_allclose(acts[name].numpy(), expected[name], rtol=1e-5, atol=1e-5, err_msg=name)

    gini = manager.get("metric", "gini")
    metric = gini.load()(**gini.resolve({"layers": layers, "all_layers": False}))
    values = {v.layer: v.as_numpy() for v in metric.compute(MetricBatch(ids, images, dict(acts)))}
    pools = [name for name in layers if name.startswith("pool")]
    assert len(pools) == (3 if builder == "alexnet" else 5)
    for name in layers:
        independent = [hurley_rickard_gini(expected[name][i]) for i in range(len(ids))]
        np.testing.assert_allclose(values[name], independent, rtol=1e-6, atol=1e-9, err_msg=name)
    assert model.weights_sha256 and model.options["size"] == "native"


def test_missing_weights_give_one_line_naming_the_file_and_the_option(manager: PluginManager, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty torchvision cache
    for arch, file in (("vgg16-imagenet", "vgg16-397923af.pth"), ("alexnet-imagenet", "alexnet-owt-7be5be79.pth"),
                       ("vgg19-imagenet", "vgg19-dcbb9e9d.pth")):
        spec = manager.get("architecture", arch)
        with pytest.raises(FluencyError) as info:
            spec.load()(**spec.resolve({}))
        text = str(info.value)
        assert "\n" not in text and file in text and str(tmp_path / "hub" / "checkpoints") in text
        assert f"-o {arch}.weights=PATH" in text
    spec = manager.get("architecture", "vgg16-imagenet")
    with pytest.raises(FluencyError, match="no such file"):
        spec.load()(**spec.resolve({"weights": str(tmp_path / "absent.pth")}))


def test_the_torchvision_cache_is_used_and_a_full_state_dict_loads(manager: PluginManager, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # a full VGG19 state dict (random weights, made here) in an otherwise empty torchvision cache
    reference = torchvision.models.vgg19(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "vgg19-dcbb9e9d.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    spec = manager.get("architecture", "vgg19-imagenet")
    model = check_architecture(spec, {"size": 32})
    assert list(model.hookable_layers()) == [f"{s}{i}" for i in range(1, 6) for s in ("conv", "pool")]
    assert model.weights_file == str(cache / "vgg19-dcbb9e9d.pth")
    for (name, mine), theirs in zip(model.features.state_dict().items(), reference.features.state_dict().values()):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize(("arch", "path"), [("vgg16-imagenet", VGG16_FILE), ("alexnet-imagenet", ALEXNET_FILE)])
def test_contract_and_size(manager: PluginManager, arch: str, path: Path) -> None:
    path = needs(path)
    spec = manager.get("architecture", arch)
    model = check_architecture(spec, {"size": 64, "weights": str(path)})
    assert model.input_shape == (3, 64, 64) and model.options["size"] == 64
    assert set(model.default_metric_layers) == {f"conv{i}" for i in range(1, 6)}
    assert not any(p.requires_grad for p in model.parameters())
    assert spec.resolve({"size": "native"})["size"] == "native"
    with pytest.raises(FluencyError, match="64×64"):
        model(torch.rand(1, 3, 64, 56))
    with pytest.raises(FluencyError, match="size"):
        spec.load()(**spec.resolve({"size": "huge", "weights": str(path)}))
    native = spec.load()(**spec.resolve({"size": "native", "weights": str(path)}))
    with pytest.raises(FluencyError, match="smallest"):
        native(torch.rand(1, 3, 24, 80))
    with pytest.raises(FluencyError, match="minimum"):
        spec.resolve({"size": 16})
    with pytest.raises(FluencyError, match="outside"):  # a number given as text is checked by the model
        spec.load()(**spec.resolve({"size": "16", "weights": str(path)}))
