"""Configurable architectures: vae-small options, vae-vgg16/19, CBAM attention, ImageNet init, checkpoint compatibility."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fluency.core.model.blocks import CBAMChannel, build_decoder, conv_block
from fluency.core.model.capture import capture_activations
from fluency.core.errors import FluencyError
from fluency.core.plugin.manager import PluginManager

VGG16_FILE = Path(__file__).resolve().parents[2] / "shared" / "weights" / "vgg16_imagenet_features.pth"
#: small VGG settings so the tests run on a CPU in seconds
TINY_VGG = {"width": 0.125, "decoder_channels": [32, 32, 16, 16, 8], "latent_dim": 8}


def build(name: str, **options: Any) -> Any:
    """A model of architecture ``name`` with ``options`` validated like the CLI does."""
    spec = PluginManager(autoload=False).get("architecture", name)
    return spec.load()(**spec.resolve(options))


def check_forward(model: Any, batch: int = 2) -> None:
    """Reconstruction = input shape, mu/logvar = B×latent, and every hookable layer fires."""
    c, h, w = model.input_shape
    x = torch.rand(batch, c, h, w)
    layers = list(model.hookable_layers())
    with capture_activations(model, layers) as acts:
        out = model(x)
    assert out.recon.shape == x.shape
    assert out.mu.shape == out.logvar.shape == (batch, model.options["latent_dim"])
    assert float(out.recon.detach().min()) >= 0 and float(out.recon.detach().max()) <= 1
    assert set(acts) == set(layers), f"layers that did not fire: {set(layers) - set(acts)}"
    for name in model.attention_layers():
        assert acts[name].shape[0] == batch and acts[name].dim() == 2


SMALL_CASES = [
    {},
    {"upsampling": "convtranspose"},
    {"upsampling": "upsample-conv"},
    {"latent": "conv"},
    {"norm": "batch"},
    {"norm": ["instance", "batch", "none", "batch", "instance"], "decoder_norm": "batch"},
    {"separable": True},
    {"spectral_norm": True},
    {"separable": True, "spectral_norm": True, "norm": "instance"},
    {"attention": ["enc3", "enc5"]},
    {"attention": ["enc1"], "attention_gate": "softmax", "attention_temperature": 0.5},
    {"in_channels": 1, "latent": "conv", "attention": ["enc2"]},
]


@pytest.mark.parametrize("options", SMALL_CASES, ids=[str(c) for c in SMALL_CASES])
def test_vae_small_options_shapes_and_layers(options: dict[str, Any]) -> None:
    model = build("vae-small", image_size=32, latent_dim=8, **options)
    check_forward(model)
    expected = [f"att{n[3:]}" for n in options.get("attention", [])]
    assert model.attention_layers() == expected


VGG_CASES = [
    ("vae-vgg16", {}),
    ("vae-vgg16", {"decoder_layers": 10, "upsampling": "convtranspose", "latent": "conv"}),
    ("vae-vgg19", {}),
    ("vae-vgg19", {"decoder_layers": 10, "upsampling": "upsample-conv", "norm": "batch"}),
    ("vae-vgg16", {"in_channels": 1, "separable": True, "spectral_norm": True, "norm": "instance"}),
    ("vae-vgg19", {"attention": ["enc3", "enc5"], "attention_gate": "softmax", "in_channels": 1}),
]


@pytest.mark.parametrize(("name", "options"), VGG_CASES, ids=[f"{n}-{o}" for n, o in VGG_CASES])
def test_vgg_options_shapes_and_layers(name: str, options: dict[str, Any]) -> None:
    model = build(name, image_size=32, **TINY_VGG, **options)
    check_forward(model)
    n_dec = options.get("decoder_layers", 5)
    layers = list(model.hookable_layers())
    assert [n for n in layers if n.startswith("dec")] == [f"dec{i}" for i in range(1, n_dec + 1)]
    assert list(model.default_metric_layers) == [f"enc{i}" for i in range(1, 6)]


@pytest.mark.parametrize(("name", "convs"), [("vae-vgg16", (2, 2, 3, 3, 3)), ("vae-vgg19", (2, 2, 4, 4, 4))])
def test_vgg_layer_names_follow_torchvision(name: str, convs: tuple[int, ...]) -> None:
    model = build(name, image_size=32, **TINY_VGG)
    layers = model.hookable_layers()
    expected = []
    for b, n in enumerate(convs, 1):
        expected += [f"conv{b}_{k}" for k in range(1, n + 1)] + [f"enc{b}", f"pool{b}"]
    assert [n for n in layers if n.startswith(("conv", "enc", "pool"))] == expected
    for b, n in enumerate(convs, 1):
        assert layers[f"enc{b}"] is layers[f"conv{b}_{n}"]  # alias of the block's last ReLU
        assert isinstance(layers[f"enc{b}"], torch.nn.ReLU)
    # plain layout = torchvision's features indices: convs at 0, 2, 5, 7, 10, ...
    conv_idx = [i for i, m in enumerate(model.encoder) if isinstance(m, torch.nn.Conv2d)]
    assert conv_idx[:4] == [0, 2, 5, 7] and len(conv_idx) == sum(convs)
    # the encoder-only parameter set (SAM's parameters="encoder") covers encoder and latent heads, not the decoder
    enc = model.encoder_parameters()
    assert "encoder.0.weight" in enc and "mu.weight" in enc and not any(k.startswith("dec") for k in enc)


def test_enc_block_pooling_resolution() -> None:
    model = build("vae-vgg16", image_size=64, **TINY_VGG)
    with capture_activations(model, ["enc1", "pool1", "enc5", "pool5"]) as acts:
        model(torch.rand(1, 3, 64, 64))
    assert acts["enc1"].shape[-1] == 64 and acts["pool1"].shape[-1] == 32
    assert acts["enc5"].shape[-1] == 4 and acts["pool5"].shape[-1] == 2


# ---- building blocks -------------------------------------------------------------------------------------------

def test_conv_block_layouts() -> None:
    plain = conv_block(3, 8)
    assert [type(m).__name__ for m in plain] == ["Conv2d", "ReLU"]
    sep = conv_block(4, 8, norm="batch", separable=True)
    assert [type(m).__name__ for m in sep] == ["Conv2d", "Conv2d", "BatchNorm2d", "ReLU"]
    assert sep[0].groups == 4 and sep[0].kernel_size == (3, 3) and sep[1].kernel_size == (1, 1)
    spec = conv_block(3, 8, norm="instance", spectral=True)
    assert hasattr(spec[0], "parametrizations") and isinstance(spec[1], torch.nn.InstanceNorm2d)
    assert conv_block(3, 8)(torch.rand(2, 3, 5, 5)).shape == (2, 8, 5, 5)
    with pytest.raises(ValueError, match="norm"):
        conv_block(3, 8, norm="layer")


def test_spectral_norm_bounds_the_weight() -> None:
    block = conv_block(8, 8, spectral=True).train()
    for _ in range(30):  # power iteration converges during forward passes
        block(torch.rand(1, 8, 4, 4))
    w = block[0].weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("upsampling", ["pixelshuffle", "convtranspose", "upsample-conv"])
def test_build_decoder(upsampling: str) -> None:
    parts = build_decoder(6, [16, 8, 8], out_channels=3, grid=2, upsampling=upsampling, convs_per_stage=2)
    assert len(parts.relu_indices) == 6 and isinstance(parts.body[-1], torch.nn.Sigmoid)
    assert all(isinstance(parts.body[i], torch.nn.ReLU) for i in parts.relu_indices)
    assert parts.decode(torch.randn(4, 6)).shape == (4, 3, 16, 16)


def features(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 32, 5, 5, generator=g) * 3


def test_cbam_sigmoid_weights_and_output() -> None:
    cbam = CBAMChannel(32, reduction=4)
    f = features()
    with capture_activations_of(cbam) as got:
        out = cbam(f)
    m = got["w"]
    assert m.shape == (3, 32) and bool(((m > 0) & (m < 1)).all())
    assert torch.allclose(out, f * m[:, :, None, None])
    # M = σ(MLP(avg) + MLP(max)) with the shared MLP, computed independently
    mlp = cbam.mlp
    expected = torch.sigmoid(mlp(f.mean(dim=(2, 3))) + mlp(f.flatten(2).max(dim=2).values))
    assert torch.allclose(m, expected, atol=1e-6)
    assert mlp[0].out_features == 8 and CBAMChannel(8, reduction=16).mlp[0].out_features == 1


def test_cbam_softmax_sums_to_one_and_temperature_limits() -> None:
    f = features(1)
    torch.manual_seed(0)
    cbam = CBAMChannel(32, reduction=4, gate="softmax", temperature=1.0)
    m = cbam.attention(f)
    assert torch.allclose(m.sum(dim=1), torch.ones(3), atol=1e-6)
    with capture_activations_of(cbam) as got:
        out = cbam(f)
    assert torch.allclose(out, f * got["w"][:, :, None, None])
    cbam.temperature = 1e6
    assert torch.allclose(cbam.attention(f), torch.full((3, 32), 1 / 32), atol=1e-5)
    cbam.temperature = 1e-4  # t → 0: one-hot on the largest logit
    hot = cbam.attention(f)
    assert torch.allclose(hot.max(dim=1).values, torch.ones(3), atol=1e-4)


def test_cbam_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        CBAMChannel(8, gate="tanh")
    with pytest.raises(ValueError):
        CBAMChannel(8, temperature=0.0)


class capture_activations_of:
    """Capture the output of a CBAM module's ``weights`` child (the hook the attention layers expose)."""

    def __init__(self, cbam: CBAMChannel) -> None:
        self.cbam, self.got = cbam, {}

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.handle = self.cbam.weights.register_forward_hook(lambda _m, _i, o: self.got.__setitem__("w", o))
        return self.got

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def test_attention_layer_is_the_weights_in_the_model() -> None:
    model = build("vae-small", image_size=32, latent_dim=8, attention=["enc3"], attention_gate="softmax")
    with capture_activations(model, ["enc3", "att3"]) as acts:
        model(torch.rand(2, 3, 32, 32))
    assert acts["att3"].shape == (2, 64)  # enc3 has 64 channels
    assert torch.allclose(acts["att3"].sum(dim=1), torch.ones(2), atol=1e-5)


# ---- option errors ---------------------------------------------------------------------------------------------

def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="5 values"):
        build("vae-small", image_size=32, norm=["batch", "none"])
    with pytest.raises(FluencyError, match="enc9"):
        build("vae-small", image_size=32, attention=["enc9"])
    with pytest.raises(ValueError, match="multiple of 32"):
        build("vae-vgg16", image_size=48)
    with pytest.raises(FluencyError):
        build("vae-vgg16", image_size=32, decoder_layers=7)


@pytest.mark.parametrize("bad", [{"norm": "batch"}, {"separable": True}, {"in_channels": 1},
                                 {"spectral_norm": True}])
def test_imagenet_weights_need_the_plain_rgb_vgg(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="imagenet_weights"):
        build("vae-vgg16", image_size=32, imagenet_weights=str(VGG16_FILE), **bad)


def test_missing_imagenet_file_names_path_and_kind(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FluencyError) as info:
        build("vae-vgg16", image_size=32, imagenet_weights=str(missing))
    assert str(missing) in str(info.value) and "torchvision" in str(info.value)


# ---- ImageNet initialisation -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg16_state() -> dict[str, torch.Tensor]:
    if not VGG16_FILE.is_file():
        pytest.skip(f"offline VGG16 ImageNet weights not found at {VGG16_FILE}")
    return torch.load(VGG16_FILE, map_location="cpu", weights_only=True)


def test_imagenet_init_and_freeze(vgg16_state: dict[str, torch.Tensor]) -> None:
    model = build("vae-vgg16", image_size=32, latent_dim=8, decoder_channels=[16, 16, 8, 8, 8],
                  imagenet_weights=str(VGG16_FILE), freeze_encoder=True, attention=["enc2"])
    key = "features.0.weight" if "features.0.weight" in vgg16_state else "0.weight"
    assert torch.equal(model.encoder[0].weight, vgg16_state[key])
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert torch.equal(convs[-1].weight, vgg16_state[key.replace(".0.", ".28.")])  # indices shifted by attention
    assert all(not p.requires_grad for m in convs for p in m.parameters())
    cbam = [m for m in model.encoder if isinstance(m, CBAMChannel)]
    assert len(cbam) == 1 and all(p.requires_grad for p in cbam[0].parameters())  # attention stays trainable
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("mu.", "decoder.")))
    assert model.options["input_norm"] == "imagenet"
    check_forward(model)


def test_imagenet_features_only_keys_without_prefix(vgg16_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    bare = tmp_path / "bare.pth"
    torch.save({k.removeprefix("features."): v for k, v in vgg16_state.items()}, bare)
    model = build("vae-vgg16", image_size=32, latent_dim=8, decoder_channels=[8] * 5, imagenet_weights=str(bare))
    assert torch.equal(model.encoder[2].weight, vgg16_state["features.2.weight"])
    with pytest.raises(FluencyError, match="features"):  # a VGG16 file has no entries for VGG19's extra convs
        build("vae-vgg19", image_size=32, latent_dim=8, decoder_channels=[8] * 5, imagenet_weights=str(bare))


# ---- checkpoint compatibility ----------------------------------------------------------------------------------

def test_default_checkpoint_loads_with_identical_outputs() -> None:
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

    model = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False)).model.eval()
    x = (torch.arange(2 * 3 * 64 * 64) % 97 / 96.0).reshape(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x, sample=False)
    # recorded with the pre-refactor vae-small (plain nn.Sequential encoder/decoder)
    assert out.mu[0, :4].tolist() == pytest.approx(
        [-2.967644453048706, -0.3354344367980957, 1.1682178974151611, 0.8205126523971558], abs=1e-5)
    assert out.logvar[1, :4].tolist() == pytest.approx(
        [-3.2013936042785645, -3.4875051975250244, -3.8962135314941406, -3.4727439880371094], abs=1e-5)
    assert out.recon.mean().item() == pytest.approx(0.43635761737823486, abs=1e-6)
    assert out.recon[0, :, 10, 20].tolist() == pytest.approx([0.5243558883666992, 0.5116662979125977,
                                                              0.5254138708114624], abs=1e-5)
    assert out.recon[1, :, 40, 5].tolist() == pytest.approx([0.391632080078125, 0.3846849501132965,
                                                             0.3928987979888916], abs=1e-5)
    assert list(model.hookable_layers()) == [*(f"enc{i}" for i in range(1, 6)), "mu", "logvar",
                                             *(f"dec{i}" for i in range(1, 6)), "out"]


def test_vgg_checkpoint_roundtrip(tmp_path: Path) -> None:
    from fluency.core.model.checkpoint import load_checkpoint, save_checkpoint

    model = build("vae-vgg19", image_size=32, attention=["enc4"], norm="batch", **TINY_VGG).eval()
    save_checkpoint(tmp_path / "m.pt", model, "vae-vgg19")
    loaded = load_checkpoint(tmp_path / "m.pt", PluginManager(autoload=False)).model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, sample=False).recon, loaded(x, sample=False).recon)


# ---- each architecture can learn -------------------------------------------------------------------------------

def smooth_images(n: int, channels: int, size: int) -> torch.Tensor:
    """Distinct smooth images (blobs at different places and colours), easier to overfit than noise."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    centres, colours = torch.rand(n, 2, generator=g), torch.rand(n, channels, generator=g)
    blob = torch.exp(-((xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2) / 0.05)
    return (0.2 + 0.8 * colours[:, :, None, None] * blob[:, None]).clamp(0, 1)


def overfit(model: Any, steps: int) -> tuple[float, float]:
    """(initial, final) loss of Adam on one batch: per-pixel MSE + 1e-3·KL, z = mu."""
    torch.manual_seed(0)
    c, size, _ = model.input_shape
    x = smooth_images(4, c, size)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and stall badly on a busy machine
    try:
        for _ in range(steps):
            losses.append(_step(model, opt, x))
    finally:
        torch.set_num_threads(threads)
    return losses[0], min(losses[-5:])


def _step(model: Any, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """One Adam step on the loss of ``overfit``; returns the loss before the step."""
    out = model(x, sample=False)
    kl = -0.5 * (1 + out.logvar - out.mu**2 - out.logvar.exp()).sum(1).mean()
    loss = torch.nn.functional.mse_loss(out.recon, x) + 1e-3 * kl
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


OVERFIT_CASES = [
    ("vae-small", {"latent_dim": 8}),
    ("vae-small", {"latent_dim": 8, "latent": "conv", "upsampling": "convtranspose", "norm": "batch",
                   "attention": ["enc3"]}),
    ("vae-vgg16", TINY_VGG),
    ("vae-vgg19", {**TINY_VGG, "decoder_layers": 10, "upsampling": "upsample-conv"}),
]


@pytest.mark.parametrize(("name", "options"), OVERFIT_CASES, ids=[f"{n}-{o}" for n, o in OVERFIT_CASES])
def test_architecture_overfits_one_batch(name: str, options: dict[str, Any]) -> None:
    model = build(name, image_size=32, **options).train()
    first, last = overfit(model, 100)
    assert last < 0.5 * first, (first, last)
