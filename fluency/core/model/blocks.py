"""Reusable building blocks of configurable VAE architectures.

Every block keeps its activation (ReLU, sigmoid) and its attention weights as separate
modules, so that a forward hook on them captures exactly one named layer. Blocks
return flat lists of modules (or plain ``nn.Sequential`` s) so that architectures can
splice them into one ``nn.Sequential`` and keep the state-dict keys of the simple
configuration unchanged (``encoder.0.weight``, ``encoder.3.weight``, …).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from fluency.core.plugin.architecture import FluencyVAE
from fluency.core.errors import FluencyError
from fluency.core.plugin.options import Option

NORMS = ("none", "batch", "instance")
UPSAMPLINGS = ("pixelshuffle", "convtranspose", "upsample-conv")
LATENTS = ("fc", "conv")
GATES = ("sigmoid", "softmax")
#: bounds of the size options of the block-built architectures, far above any use (the built-in models
#: have 64–128 pixels, 32–128 latent dimensions and at most 512 channels) and low enough that a checkpoint
#: naming absurd sizes is refused before a model is built (a checkpoint's options are validated)
MAX_IMAGE_SIZE = 2048
MAX_LATENT_DIM = 65536
MAX_CHANNELS = 4096


class ArchitectureConfigError(FluencyError, ValueError):
    """An invalid combination of architecture options (a ``ValueError`` the CLI reports in one line)."""


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``, else an :class:`ArchitectureConfigError` naming ``what``."""
    if value not in choices:
        raise ArchitectureConfigError(f"{what}: {value!r} is not one of {list(choices)}")
    return value


def per_block(value: str | Sequence[str] | None, n: int, what: str, default: str = "none") -> list[str]:
    """A per-block setting from one value (applied to all ``n`` blocks) or a list of ``n`` values."""
    if value is None:
        values = [default] * n
    elif isinstance(value, str):
        values = [value] * n
    else:
        values = list(value)
        if len(values) == 1:
            values = values * n
    if len(values) != n:
        raise ArchitectureConfigError(f"{what}: give one value for all blocks or {n} values, got {len(values)}")
    return [check_choice(v, NORMS, what) for v in values]


def norm_layer(kind: str, channels: int) -> nn.Module | None:
    """BatchNorm2d, InstanceNorm2d (affine, so it has weights like BatchNorm) or ``None`` for ``"none"``."""
    check_choice(kind, NORMS, "norm")
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return None


def _maybe_spectral(module: nn.Module, spectral: bool) -> nn.Module:
    return _spectral_norm(module) if spectral else module


def conv_layers(c_in: int, c_out: int, separable: bool = False, spectral: bool = False) -> list[nn.Module]:
    """A 3×3 convolution (padding 1), or depthwise 3×3 (groups = ``c_in``) + pointwise 1×1 when ``separable``.

    ``spectral`` wraps each convolution in spectral normalisation (Miyato et al. 2018),
    which bounds its Lipschitz constant.
    """
    if separable:
        convs: list[nn.Module] = [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.Conv2d(c_in, c_out, 1)]
    else:
        convs = [nn.Conv2d(c_in, c_out, 3, padding=1)]
    return [_maybe_spectral(c, spectral) for c in convs]


def conv_block(c_in: int, c_out: int, norm: str = "none", separable: bool = False,
               spectral: bool = False) -> nn.Sequential:
    """conv3×3 (or depthwise-separable) → optional norm → ReLU; the ReLU is the block's last module.

    With the defaults the block is ``[Conv2d, ReLU]``, so splicing it into a sequential
    reproduces the plain VGG layout (and torchvision's ``features`` indices).
    """
    layers = conv_layers(c_in, c_out, separable, spectral)
    norm_module = norm_layer(norm, c_out)
    if norm_module is not None:
        layers.append(norm_module)
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CBAMChannel(nn.Module):
    """Channel attention of CBAM (Woo et al. 2018): ``M = gate(MLP(avgpool F) + MLP(maxpool F))``, output ``F·M``.

    The MLP is shared, ``C → max(C // reduction, 1) → C`` with a ReLU. ``gate="sigmoid"``
    gives independent weights in (0, 1); ``gate="softmax"`` gives ``softmax(a / temperature)``
    over channels, which sums to 1 per image (t → 0: one-hot, t → ∞: uniform 1/C) and so
    scales the feature maps down by about 1/C. The weights ``M`` (B×C) pass through the
    child module :attr:`weights` (an identity) so that a forward hook on it captures them.
    """

    def __init__(self, channels: int, reduction: int = 16, gate: str = "sigmoid", temperature: float = 1.0) -> None:
        super().__init__()
        self.gate = check_choice(gate, GATES, "attention gate")
        if temperature <= 0:
            raise ArchitectureConfigError(f"attention temperature must be positive, got {temperature}")
        if reduction < 1:
            raise ArchitectureConfigError(f"attention reduction must be at least 1, got {reduction}")
        self.temperature = float(temperature)
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.weights = nn.Identity()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The B×C attention weights ``M`` of feature maps ``x`` (B×C×H×W)."""
        logits = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        if self.gate == "softmax":
            return torch.softmax(logits / self.temperature, dim=1)
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.weights(self.attention(x))
        return x * m[:, :, None, None]


class ConvLatentHead(nn.Module):
    """A 1×1 convolution to ``latent_dim`` channels, then a global average: B×C×g×g → B×latent_dim.

    Used twice (``mu`` and ``logvar``), it is exactly one 1×1 convolution to
    ``2·latent_dim`` channels split in two. Since both steps are linear it equals
    global-average-then-linear: its size does not depend on the image size and it is
    translation-invariant, unlike the fully connected head, which sees where features are.
    """

    def __init__(self, channels: int, latent_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class FlatLatentHead(nn.Linear):
    """Flatten B×C×g×g, then a linear layer to ``latent_dim`` (state-dict keys ``weight``/``bias`` of a Linear)."""

    def __init__(self, channels: int, grid: int, latent_dim: int) -> None:
        super().__init__(channels * grid * grid, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


def latent_head(kind: str, channels: int, grid: int, latent_dim: int) -> nn.Module:
    """One latent head (``mu`` or ``logvar``): ``"fc"`` = flatten → Linear, ``"conv"`` = 1×1 conv → global average."""
    check_choice(kind, LATENTS, "latent")
    if kind == "conv":
        return ConvLatentHead(channels, latent_dim)
    return FlatLatentHead(channels, grid, latent_dim)


def upsampling_layers(kind: str, c_in: int, c_out: int) -> list[nn.Module]:
    """Layers that double the resolution and map ``c_in`` → ``c_out`` channels (no activation).

    ``pixelshuffle``: conv3×3 to 4·c_out then PixelShuffle(2) (no checkerboard artefacts);
    ``convtranspose``: ConvTranspose2d(k=4, s=2, p=1); ``upsample-conv``: nearest ×2 then conv3×3.
    """
    check_choice(kind, UPSAMPLINGS, "upsampling")
    if kind == "pixelshuffle":
        return [nn.Conv2d(c_in, c_out * 4, 3, padding=1), nn.PixelShuffle(2)]
    if kind == "convtranspose":
        return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]


@dataclass
class DecoderParts:
    """A decoder: ``fc`` maps z to a ``start_channels``×grid×grid map that ``body`` turns into pixels.

    ``relu_indices`` are the positions in ``body`` of the post-activation ReLUs of the
    decoder layers (name them ``dec1``…``decN``); ``body[-1]`` is the output sigmoid.
    """

    fc: nn.Linear
    body: nn.Sequential
    start_channels: int
    grid: int
    relu_indices: list[int] = field(default_factory=list)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Run the decoder (for architectures that keep ``fc`` and ``body`` as their own attributes, use theirs)."""
        return self.body(self.fc(z).view(-1, self.start_channels, self.grid, self.grid))


def build_decoder(latent_dim: int, channels: Sequence[int], out_channels: int, grid: int,
                  upsampling: str = "pixelshuffle", norm: str = "none", convs_per_stage: int = 1) -> DecoderParts:
    """Linear(z → C₀·grid²) → ReLU, then one stage per entry of ``channels``, then conv3×3 → sigmoid.

    A stage doubles the resolution (``upsampling``) → optional norm → ReLU, followed by
    ``convs_per_stage − 1`` conv3×3 → norm → ReLU layers at that resolution; so there are
    ``len(channels) · convs_per_stage`` decoder layers and the output is ``grid·2^len(channels)``
    pixels wide. With the defaults the body is ``[ReLU, (Conv, PixelShuffle, ReLU)×N, Conv, Sigmoid]``.
    """
    if convs_per_stage < 1:
        raise ArchitectureConfigError(f"convs_per_stage must be at least 1, got {convs_per_stage}")
    start = int(channels[0])
    layers: list[nn.Module] = [nn.ReLU()]
    relus: list[int] = []
    c_in = start
    for c_out in channels:
        for j in range(convs_per_stage):
            layers += upsampling_layers(upsampling, c_in, c_out) if j == 0 else conv_layers(c_in, c_out)
            norm_module = norm_layer(norm, c_out)
            if norm_module is not None:
                layers.append(norm_module)
            relus.append(len(layers))
            layers.append(nn.ReLU())
            c_in = c_out
    layers += [nn.Conv2d(c_in, out_channels, 3, padding=1), nn.Sigmoid()]
    fc = nn.Linear(latent_dim, start * grid * grid)
    return DecoderParts(fc, nn.Sequential(*layers), start, grid, relus)


@dataclass
class EncoderParts:
    """A VGG-like encoder as one flat ``nn.Sequential`` plus where its named layers are.

    Indices are positions in ``body``: ``relus[s][k]`` is the ReLU after the k-th
    convolution of stage s, ``convs[s][k]`` its (first) convolution, ``attention[s]`` the
    CBAM module after stage s (if any) and ``pools[s]`` the stage's max-pool.
    """

    body: nn.Sequential
    relus: list[list[int]]
    convs: list[list[int]]
    pools: list[int]
    attention: dict[int, int]


def build_encoder(in_channels: int, stages: Sequence[Sequence[int]], norms: Sequence[str],
                  separable: bool = False, spectral: bool = False, attention: Sequence[int] = (),
                  gate: str = "sigmoid", temperature: float = 1.0, reduction: int = 16) -> EncoderParts:
    """Stages of conv blocks (:func:`conv_block`, one per entry of ``stages[s]``), each ended by a 2×2 max-pool.

    ``norms[s]`` is the norm of stage s; a CBAM channel attention is inserted after the
    last ReLU of each stage listed in ``attention`` (0-based), before the pool. With no
    norm, separable, spectral or attention the layout is torchvision's VGG ``features``.
    """
    if len(norms) != len(stages):
        raise ArchitectureConfigError(f"norm: need {len(stages)} values (one per encoder block), got {len(norms)}")
    layers: list[nn.Module] = []
    parts = EncoderParts(nn.Sequential(), [], [], [], {})
    c_in = in_channels
    for s, widths in enumerate(stages):
        parts.relus.append([])
        parts.convs.append([])
        for c_out in widths:
            parts.convs[s].append(len(layers))
            layers += list(conv_block(c_in, c_out, norms[s], separable, spectral))
            parts.relus[s].append(len(layers) - 1)
            c_in = c_out
        if s in attention:
            parts.attention[s] = len(layers)
            layers.append(CBAMChannel(c_in, reduction, gate, temperature))
        parts.pools.append(len(layers))
        layers.append(nn.MaxPool2d(2))
    parts.body = nn.Sequential(*layers)
    return parts


def attention_stages(names: Sequence[str] | None, n: int, prefix: str = "enc") -> list[int]:
    """0-based stage indices from block names ``enc1``…``encN`` (as given in an ``attention`` option)."""
    valid = [f"{prefix}{i}" for i in range(1, n + 1)]
    out = []
    for name in names or []:
        check_choice(name, valid, "attention")
        out.append(valid.index(name))
    return sorted(set(out))


def check_image_size(name: str, image_size: int, n_pools: int) -> int:
    """The latent grid ``image_size / 2^n_pools``; an error unless ``image_size`` is a positive multiple of it."""
    if image_size < 2**n_pools or image_size % 2**n_pools:
        raise ArchitectureConfigError(f"{name}: image_size must be a multiple of {2**n_pools}, got {image_size}")
    return image_size // 2**n_pools


class BlockVAE(FluencyVAE):
    """A VAE made of an :class:`EncoderParts` encoder, two latent heads and a :class:`DecoderParts` decoder.

    Subclasses call :meth:`_assemble` in ``__init__``; the modules are the attributes
    ``encoder``, ``mu``, ``logvar``, ``dec_fc`` and ``decoder`` (the state-dict prefixes).
    Named encoder layers are kept as ``{name: index in encoder}`` so the module tree holds
    every module exactly once.
    """

    encoder_prefixes: ClassVar[tuple[str, ...]] = ("encoder.", "mu.", "logvar.")

    def _assemble(self, enc: EncoderParts, enc_names: dict[str, int], latent: str, latent_dim: int,
                  dec: DecoderParts) -> None:
        self.encoder = enc.body
        self._enc_names = dict(enc_names)
        self._att_names = [n for n, i in enc_names.items() if isinstance(enc.body[i], CBAMChannel)]
        channels = _last_channels(enc.body)
        self.mu = latent_head(latent, channels, dec.grid, latent_dim)
        self.logvar = latent_head(latent, channels, dec.grid, latent_dim)
        self.dec_fc, self.decoder = dec.fc, dec.body
        self._dec_relus, self._dec_start, self.grid = list(dec.relu_indices), dec.start_channels, dec.grid

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input from an image batch in [0, 1] (identity; VGG may normalise)."""
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.prepare(x))
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.dec_fc(z).view(-1, self._dec_start, self.grid, self.grid))

    def attention_layers(self) -> list[str]:
        """Names of the attention layers (their outputs are the B×C CBAM weights), in forward order."""
        return list(self._att_names)

    def hookable_layers(self) -> dict[str, nn.Module]:
        named: dict[str, nn.Module] = {}
        for name, index in self._enc_names.items():
            module = self.encoder[index]
            named[name] = module.weights if isinstance(module, CBAMChannel) else module
        named.update(mu=self.mu, logvar=self.logvar)
        named.update({f"dec{i}": self.decoder[j] for i, j in enumerate(self._dec_relus, 1)})
        named["out"] = self.decoder[-1]
        return named


def _last_channels(body: nn.Sequential) -> int:
    """Output channels of the last convolution in ``body``."""
    convs = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)

def block_options(block_names: tuple[str, ...]) -> dict[str, Option]:
    """Options shared by the block-built architectures (``vae-small``, ``vae-vgg16``, ``vae-vgg19``)."""
    n = len(block_names)
    return {
        "latent": Option("str", "fc", "latent head: fc = flatten → Linear; conv = 1×1 conv → global average",
                         choices=LATENTS),
        "upsampling": Option("str", "pixelshuffle", "decoder upsampling", choices=UPSAMPLINGS),
        "norm": Option("list[str]", ["none"], f"encoder normalisation: one value for all blocks or {n} values "
                       "(one per block)", choices=NORMS),
        "decoder_norm": Option("str", "none", "decoder normalisation", choices=NORMS),
        "separable": Option("bool", False, "depthwise-separable encoder convolutions (depthwise 3×3 + pointwise 1×1)"),
        "spectral_norm": Option("bool", False, "spectral normalisation of the encoder convolutions"),
        "attention": Option("list[str]", [], "encoder blocks followed by CBAM channel attention (layer attN)",
                            choices=block_names),
        "attention_gate": Option("str", "sigmoid", "attention gate: sigmoid (weights in (0,1)) or softmax "
                                 "(weights sum to 1)", choices=GATES),
        "attention_temperature": Option("float", 1.0, "softmax temperature of the attention gate", minimum=1e-6),
        "attention_reduction": Option("int", 16, "channel reduction ratio r of the attention MLP", minimum=1,
                                      maximum=MAX_CHANNELS),
    }
