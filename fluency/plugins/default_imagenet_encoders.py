"""Architectures ``alexnet-imagenet``, ``vgg16-imagenet`` and ``vgg19-imagenet``: torchvision's ImageNet CNNs
as encoder-only models of the ventral stream, used as they are (never trained).

The network is torchvision's ``alexnet().features`` / ``vgg16().features`` / ``vgg19().features``, built
without weights and then loaded from a local state dict (full torchvision checkpoint or features-only):
the option ``weights``, else torchvision's own cache file (``torch.hub.get_dir()/checkpoints/<file>``,
where torchvision keeps what it downloads), else a :class:`fluency.FluencyError` saying which file to
place where. Nothing is downloaded.

Images arrive in [0, 1] and are normalised with ImageNet's mean and standard deviation inside
``forward``. Option ``size``: an integer N (default 224; the run's preprocessing scales the shorter side
to N and crops the centre N×N, as for every model, through :attr:`input_shape`) or ``"native"`` (images
as they are, all of one size; the network is fully convolutional, so any size from the network's minimum
works). ``fluency run --model vgg16-imagenet`` builds one without a checkpoint; its identity in the run
is its name and the weights' sha256 (:meth:`weights_origin`).

Hookable layers, in forward order: ``convB`` (output of the last ReLU of block B, before its pool) and
``poolB`` (the block's max-pool). VGG16/19 have five blocks: ``conv1``, ``pool1`` … ``conv5``, ``pool5``.
AlexNet has five convolutions and three max-pools: ``conv1``, ``pool1``, ``conv2``, ``pool2``, ``conv3``,
``conv4``, ``conv5``, ``pool5``. Activation metrics read ``conv1`` … ``conv5`` when no layer is named:
the same tensors as ``encB`` of ``vae-vgg16``/``vae-vgg19`` (the block's output before pooling), and five
stages for every network alike (AlexNet has no ``pool3``/``pool4``); the pools stay one ``layers`` option
away.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fluency import ArchitectureSpec, FluencyError, Option, hookimpl
from fluency.api import EncoderOutput, FluencyEncoder
from fluency.blocks import IMAGENET_MEAN, IMAGENET_STD, ArchitectureConfigError, load_features, read_features_state_dict

DEFAULT_SIZE = 224
NATIVE = "native"
#: the largest side accepted for ``size`` (an integer)
MAX_SIZE = 4096
#: per network: torchvision builder, its ImageNet weights enum, display name, smallest input side
NETWORKS: dict[str, tuple[str, str, str, int]] = {
    "alexnet": ("alexnet", "AlexNet_Weights", "AlexNet", 63),
    "vgg16": ("vgg16", "VGG16_Weights", "VGG16", 32),
    "vgg19": ("vgg19", "VGG19_Weights", "VGG19", 32),
}
#: AlexNet's pools are named after the convolution stage they follow
ALEXNET_POOLS = {1: "pool1", 2: "pool2", 5: "pool5"}


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError:
        raise FluencyError("the ImageNet encoders need torchvision: pip install torchvision") from None
    return torchvision


def cache_file(network: str) -> Path:
    """Where torchvision keeps (and would download) ``network``'s ImageNet weights."""
    _, enum, _, _ = NETWORKS[network]
    url = getattr(_torchvision().models, enum).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def stage_layers(features: nn.Sequential, network: str) -> dict[str, int]:
    """``{layer name: index in features}`` in forward order: ``convB`` = the last ReLU of stage B,
    ``poolB`` = a max-pool closing stage B (see the module docstring)."""
    names: dict[str, int] = {}
    stage, last_relu = 0, None
    for index, module in enumerate(features):
        if isinstance(module, nn.ReLU):
            if network == "alexnet":  # every AlexNet convolution is a stage
                stage += 1
                names[f"conv{stage}"] = index
            last_relu = index
        elif isinstance(module, nn.MaxPool2d):
            if network == "alexnet":
                names[ALEXNET_POOLS[stage]] = index
            else:
                stage += 1
                names[f"conv{stage}"] = last_relu  # type: ignore[assignment]
                names[f"pool{stage}"] = index
    return names


class ImageNetEncoder(FluencyEncoder):
    """A torchvision ImageNet CNN's ``features`` as an encoder-only model; see the module docstring."""

    network: ClassVar[str] = "vgg16"
    default_metric_layers: ClassVar[tuple[str, ...]] = tuple(f"conv{i}" for i in range(1, 6))
    encoder_prefixes: ClassVar[tuple[str, ...]] = ("features.",)

    def __init__(self, size: int | str = DEFAULT_SIZE, weights: str | None = None, **extra: Any) -> None:
        name = f"{self.network}-imagenet"
        builder, _, _, minimum = NETWORKS[self.network]
        if isinstance(size, str):
            text = size.strip().lower()
            if text != NATIVE and not text.isdigit():
                raise ArchitectureConfigError(f"{name}: size {size!r} is neither {NATIVE!r} nor a whole number")
            size = text if text == NATIVE else int(text)
        if size != NATIVE and not minimum <= int(size) <= MAX_SIZE:
            raise ArchitectureConfigError(f"{name}: size {size} is outside [{minimum}, {MAX_SIZE}] (the smallest "
                                          f"input {self.network} takes is {minimum}×{minimum})")
        state, path, digest = self.read_weights(weights)  # first: a missing file fails before the network is built
        super().__init__(size=size, weights=weights, **extra)
        #: the weights' file and sha256, which identify this pretrained model
        self.weights_file, self.weights_sha256 = str(path), digest
        self.features = getattr(_torchvision().models, builder)(weights=None).features
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # a captured layer is never overwritten by a later in-place op
        self._layers = stage_layers(self.features, self.network)
        self._load(state, f"{path} ({name} weights)")
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def read_weights(cls, weights: str | None) -> tuple[dict[int, dict[str, torch.Tensor]], Path, str]:
        """The ImageNet weights, from ``weights`` or torchvision's cache, as ``{feature index: tensors}``,
        with their file and sha256."""
        name = f"{cls.network}-imagenet"
        cached = cache_file(cls.network)
        path = Path(weights).expanduser() if weights else cached
        if not weights and not cached.is_file():
            _, _, display, _ = NETWORKS[cls.network]
            raise FluencyError(f"{name} needs ImageNet weights and found none: place torchvision's {cached.name} "
                               f"in {cached.parent}/ or give -o {name}.weights=PATH (a torchvision {display} "
                               "state dict, full or features-only)")
        state = read_features_state_dict(path, f"{path} ({name} weights)")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return state, path, digest.hexdigest()

    def _load(self, state: dict[int, dict[str, torch.Tensor]], label: str) -> None:
        convs = {i: m for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)}
        load_features(convs, state, label)

    @property
    def input_shape(self) -> tuple[int, int | None, int | None]:
        """``(3, N, N)`` for ``size`` N; ``(3, None, None)`` for ``size=native`` (images at their own size)."""
        size = self.options["size"]
        return (3, None, None) if size == NATIVE else (3, int(size), int(size))

    def weights_origin(self) -> dict[str, str]:
        """The ImageNet weights' file and sha256: this model's identity in a run."""
        return {"file": self.weights_file, "sha256": self.weights_sha256}

    def hookable_layers(self) -> dict[str, nn.Module]:
        return {name: self.features[index] for name, index in self._layers.items()}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet mean/std normalisation of images in [0, 1]."""
        return (x - self._mean) / self._std

    def forward(self, x: torch.Tensor, sample: bool = True) -> EncoderOutput:
        """The last layer's output (``pool5``) for images ``x`` (B×3×H×W in [0, 1]); ``sample`` is ignored."""
        size = self.options["size"]
        if x.dim() != 4 or x.shape[1] != 3:
            raise FluencyError(f"{self.network}-imagenet takes B×3×H×W images, got {tuple(x.shape)}")
        smallest = NETWORKS[self.network][3]
        if size == NATIVE and min(x.shape[2:]) < smallest:
            raise FluencyError(f"{self.network}-imagenet: images of {x.shape[2]}×{x.shape[3]} are below the smallest "
                               f"input it takes ({smallest}×{smallest})")
        if size != NATIVE and tuple(x.shape[2:]) != (size, size):
            raise FluencyError(f"{self.network}-imagenet size={size} takes {size}×{size} images, got "
                               f"{x.shape[2]}×{x.shape[3]} (resize them, or use -o {self.network}-imagenet.size=native)")
        return EncoderOutput(self.features(self.prepare(x)))


class AlexNetImageNet(ImageNetEncoder):
    """``alexnet-imagenet``."""

    network: ClassVar[str] = "alexnet"


class VGG16ImageNet(ImageNetEncoder):
    """``vgg16-imagenet``."""

    network: ClassVar[str] = "vgg16"


class VGG19ImageNet(ImageNetEncoder):
    """``vgg19-imagenet``."""

    network: ClassVar[str] = "vgg19"


def imagenet_options(network: str) -> dict[str, Option]:
    """The typed options of ``NETWORK-imagenet``."""
    _, _, display, minimum = NETWORKS[network]
    return {
        "size": Option("int|str", DEFAULT_SIZE, f"input side N (shorter side scaled to N, centre N×N crop; "
                       f"{minimum}–{MAX_SIZE}) or 'native' (images as they are)", minimum=minimum, maximum=MAX_SIZE),
        "weights": Option("str", None, f"local torchvision {display} state dict (full or features-only); default: "
                          "torchvision's cache file"),
    }


@hookimpl
def fluency_register_architectures() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(name="alexnet-imagenet", factory=AlexNetImageNet, options=imagenet_options("alexnet"),
                         description="torchvision's ImageNet AlexNet features as a fixed encoder (conv1–5, "
                                     "pool1/2/5)."),
        ArchitectureSpec(name="vgg16-imagenet", factory=VGG16ImageNet, options=imagenet_options("vgg16"),
                         description="torchvision's ImageNet VGG16 features as a fixed encoder (conv1–5, pool1–5)."),
        ArchitectureSpec(name="vgg19-imagenet", factory=VGG19ImageNet, options=imagenet_options("vgg19"),
                         description="torchvision's ImageNet VGG19 features as a fixed encoder (conv1–5, pool1–5)."),
    ]
