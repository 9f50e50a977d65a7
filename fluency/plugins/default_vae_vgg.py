"""Architectures ``vae-vgg16`` and ``vae-vgg19``: VAEs whose encoder is torchvision's VGG ``features``.

Encoder: VGG16 = [64,64,M,128,128,M,256×3,M,512×3,M,512×3,M], VGG19 = the same with
four convolutions in blocks 3–5 (torchvision's configurations D and E), built from
:func:`fluency.core.model.blocks.conv_block`, so ``norm``, ``separable``, ``spectral_norm`` and
CBAM ``attention`` (after the last ReLU of chosen blocks, before the pool) work as in
``vae-small``. With the plain options the encoder's module indices are torchvision's, and
``imagenet_weights`` can initialise it from a local torchvision VGG state dict.

Hookable layers, in forward order: ``convB_K`` (output of the ReLU after the K-th
convolution of block B, torchvision's ``reluB_K``), ``encB`` (alias of the last
``convB_K`` of block B: the block's output before pooling, as in ``vae-small``), ``attB``
(CBAM weights, B×C, when enabled), ``poolB``, then ``mu``, ``logvar``, ``dec1``…``decN``
(N = ``decoder_layers``, 5 or 10) and ``out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fluency import ArchitectureSpec, Option, hookimpl
from fluency.blocks import IMAGENET_MEAN, IMAGENET_STD, load_features, read_features_state_dict
from fluency.blocks import (block_options, ArchitectureConfigError, BlockVAE, EncoderParts, attention_stages,
                            build_decoder, build_encoder, check_choice, check_image_size, per_block)
from fluency.blocks import MAX_CHANNELS, MAX_IMAGE_SIZE, MAX_LATENT_DIM

N_BLOCKS = 5
BLOCK_NAMES = tuple(f"enc{i}" for i in range(1, N_BLOCKS + 1))
#: convolutions per block of torchvision's VGG configurations
VGG_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
VGG_WIDTHS = (64, 128, 256, 512, 512)
INPUT_NORMS = ("auto", "none", "imagenet")


def vgg_stages(depth: str, width: float = 1.0) -> list[list[int]]:
    """Channels of each convolution, per block, of VGG ``depth`` scaled by ``width``."""
    return [[max(1, round(c * width))] * n for c, n in zip(VGG_WIDTHS, VGG_CONVS[depth])]


def torchvision_indices(stages: list[list[int]]) -> list[list[int]]:
    """Index in torchvision's ``features`` of each convolution (conv + ReLU take 2 slots, a pool 1)."""
    out, index = [], 0
    for widths in stages:
        out.append([index + 2 * k for k in range(len(widths))])
        index += 2 * len(widths) + 1
    return out


class VAEVGG(BlockVAE):
    """A VAE with a VGG16/VGG19 encoder; see the module docstring."""

    default_metric_layers: ClassVar[tuple[str, ...]] = BLOCK_NAMES
    depth: ClassVar[str] = "vgg16"

    def __init__(self, image_size: int = 128, in_channels: int = 3, latent_dim: int = 128, width: float = 1.0,
                 decoder_layers: int = 5, decoder_channels: list[int] | None = None, latent: str = "fc",
                 upsampling: str = "pixelshuffle", norm: str | list[str] | None = None, decoder_norm: str = "none",
                 separable: bool = False, spectral_norm: bool = False, attention: list[str] | None = None,
                 attention_gate: str = "sigmoid", attention_temperature: float = 1.0, attention_reduction: int = 16,
                 imagenet_weights: str | None = None, freeze_encoder: bool = False, input_norm: str = "auto",
                 **extra: Any) -> None:
        name = f"vae-{self.depth}"
        decoder_channels = list(decoder_channels or [512, 256, 128, 64, 32])
        grid = check_image_size(name, image_size, N_BLOCKS)
        if decoder_layers not in (5, 10):
            raise ArchitectureConfigError(f"{name}: decoder_layers must be 5 or 10, got {decoder_layers}")
        if len(decoder_channels) != N_BLOCKS:
            raise ArchitectureConfigError(f"{name}: decoder_channels needs {N_BLOCKS} entries (one per upsampling)")
        norms = per_block(norm, N_BLOCKS, f"{name} norm")
        stages = attention_stages(attention, N_BLOCKS)
        input_norm = check_choice(input_norm, INPUT_NORMS, f"{name} input_norm")
        if input_norm == "auto":
            input_norm = "imagenet" if imagenet_weights else "none"
        if imagenet_weights:
            check_imagenet_compatible(name, norms, separable, spectral_norm, in_channels, width)
        super().__init__(image_size=image_size, in_channels=in_channels, latent_dim=latent_dim, width=float(width),
                         decoder_layers=decoder_layers, decoder_channels=decoder_channels,
                         latent=latent, upsampling=upsampling, norm=norms, decoder_norm=decoder_norm,
                         separable=bool(separable), spectral_norm=bool(spectral_norm),
                         attention=[BLOCK_NAMES[s] for s in stages], attention_gate=attention_gate,
                         attention_temperature=float(attention_temperature),
                         attention_reduction=int(attention_reduction), imagenet_weights=imagenet_weights,
                         freeze_encoder=bool(freeze_encoder), input_norm=input_norm, **extra)
        conv_stages = vgg_stages(self.depth, width)
        enc = build_encoder(in_channels, conv_stages, norms, bool(separable), bool(spectral_norm), stages,
                            attention_gate, float(attention_temperature), int(attention_reduction))
        dec = build_decoder(latent_dim, decoder_channels, in_channels, grid, upsampling, decoder_norm,
                            convs_per_stage=decoder_layers // N_BLOCKS)
        self._assemble(enc, vgg_layer_names(enc), latent, latent_dim, dec)
        self._init_encoder(enc)
        self._normalize = input_norm == "imagenet"
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN[:in_channels]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD[:in_channels]).view(1, -1, 1, 1), persistent=False)
        if imagenet_weights:
            self._load_imagenet(enc, conv_stages, imagenet_weights)
        if freeze_encoder:
            self._freeze_encoder_convs()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet mean/std normalisation when ``input_norm`` is ``imagenet`` (what ImageNet weights expect)."""
        return (x - self._mean) / self._std if self._normalize else x

    def _init_encoder(self, enc: EncoderParts) -> None:
        """torchvision's VGG initialisation (Kaiming normal, fan-out, zero bias), which trains a deep plain stack."""
        for module in enc.body.modules():
            if isinstance(module, nn.Conv2d):
                weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") \
                    else module.weight
                nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _load_imagenet(self, enc: EncoderParts, conv_stages: list[list[int]], path: str) -> None:
        """Copy a torchvision VGG state dict (full or features-only) into the encoder's convolutions."""
        modules = {tv: self.encoder[mine] for tvs, mines in zip(torchvision_indices(conv_stages), enc.convs)
                   for tv, mine in zip(tvs, mines)}
        load_features(modules, read_features_state_dict(Path(path)), f"{path} (vae-{self.depth} imagenet_weights)")

    def _freeze_encoder_convs(self) -> None:
        """``requires_grad = False`` on every encoder convolution (norms and attention stay trainable)."""
        for module in self.encoder.modules():
            if isinstance(module, nn.Conv2d):
                for p in module.parameters():
                    p.requires_grad_(False)


class VAEVGG16(VAEVGG):
    """``vae-vgg16``."""

    depth: ClassVar[str] = "vgg16"


class VAEVGG19(VAEVGG):
    """``vae-vgg19``."""

    depth: ClassVar[str] = "vgg19"


def check_imagenet_compatible(name: str, norms: list[str], separable: bool, spectral: bool, in_channels: int,
                              width: float) -> None:
    """ImageNet weights fit only the plain RGB VGG: no norm, ordinary convolutions, full width."""
    problems = []
    if any(n != "none" for n in norms):
        problems.append(f"norm {norms} (needs 'none')")
    if separable:
        problems.append("separable convolutions")
    if spectral:
        problems.append("spectral_norm (it would rescale the ImageNet weights)")
    if in_channels != 3:
        problems.append(f"in_channels {in_channels} (needs 3)")
    if width != 1.0:
        problems.append(f"width {width} (needs 1.0)")
    if problems:
        raise ArchitectureConfigError(f"{name}: imagenet_weights only fit the plain RGB VGG; incompatible: "
                                      + ", ".join(problems))


def vgg_layer_names(enc: EncoderParts) -> dict[str, int]:
    """``{layer name: index in the encoder}`` in forward order (see the module docstring)."""
    names: dict[str, int] = {}
    for s, relus in enumerate(enc.relus):
        for k, index in enumerate(relus):
            names[f"conv{s + 1}_{k + 1}"] = index
        names[f"enc{s + 1}"] = relus[-1]
        if s in enc.attention:
            names[f"att{s + 1}"] = enc.attention[s]
        names[f"pool{s + 1}"] = enc.pools[s]
    return names


def vgg_options(depth: str) -> dict[str, Option]:
    """The typed options of ``vae-vgg16`` / ``vae-vgg19``."""
    return {
        "image_size": Option("int", 128, "input height and width (a multiple of 32)", minimum=32,
                             maximum=MAX_IMAGE_SIZE),
        "in_channels": Option("int", 3, "image channels (3 = RGB, 1 = grayscale)", choices=(1, 3)),
        "latent_dim": Option("int", 128, "size of the latent Gaussian", minimum=1, maximum=MAX_LATENT_DIM),
        "width": Option("float", 1.0, "multiplier of VGG's channel counts (1.0 = torchvision's)", minimum=1e-3,
                        maximum=MAX_CHANNELS / max(VGG_WIDTHS)),
        "decoder_layers": Option("int", 5, "decoder conv layers: 5 (one per upsampling) or 10 (two)", choices=(5, 10)),
        "decoder_channels": Option("list[int]", [512, 256, 128, 64, 32], "channels of the 5 decoder stages",
                                   minimum=1, maximum=MAX_CHANNELS),
        **block_options(BLOCK_NAMES),
        "imagenet_weights": Option("str", None, f"local torchvision {depth.upper()} state dict (full or features-only) "
                                   "to initialise the encoder; needs norm none, no separable/spectral, RGB"),
        "freeze_encoder": Option("bool", False, "do not train the encoder convolutions (requires_grad False)"),
        "input_norm": Option("str", "auto", "input normalisation: imagenet mean/std, none, or auto (imagenet "
                             "iff imagenet_weights is set)", choices=INPUT_NORMS),
    }


@hookimpl
def fluency_register_architectures() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(name="vae-vgg16", factory=VAEVGG16, options=vgg_options("vgg16"),
                         description="VAE with torchvision's VGG16 encoder (13 conv), optional ImageNet init, "
                                     "5 or 10 decoder layers."),
        ArchitectureSpec(name="vae-vgg19", factory=VAEVGG19, options=vgg_options("vgg19"),
                         description="VAE with torchvision's VGG19 encoder (16 conv), optional ImageNet init, "
                                     "5 or 10 decoder layers."),
    ]
