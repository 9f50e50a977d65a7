"""Architecture ``vae-small``: a small VGG-like VAE, the default brain model.

Encoder: five blocks conv3×3 → ReLU → max-pool 2×2 (no residual connections, as in
VGG). Latent: fully connected ``mu`` and ``logvar`` with the reparameterisation trick.
Decoder: a fully connected layer to a 2^k grid, then five blocks conv3×3 →
PixelShuffle(2) → ReLU, and a 3×3 convolution with a sigmoid to pixels in [0, 1].
Hookable layers: ``enc1``…``enc5`` (post-ReLU feature maps, before pooling), ``mu``,
``logvar``, ``dec1``…``dec5`` and ``out``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fluency import ArchitectureSpec, Option, hookimpl
from fluency.core.architecture import FluencyVAE

N_BLOCKS = 5


class VAESmall(FluencyVAE):
    """The ``vae-small`` model; see the module docstring."""

    default_metric_layers: ClassVar[tuple[str, ...]] = tuple(f"enc{i}" for i in range(1, N_BLOCKS + 1))
    encoder_prefixes: ClassVar[tuple[str, ...]] = ("encoder.", "mu.", "logvar.")

    def __init__(self, image_size: int = 64, in_channels: int = 3, latent_dim: int = 32,
                 channels: list[int] | None = None, decoder_channels: list[int] | None = None,
                 **extra: Any) -> None:
        channels = list(channels or [16, 32, 64, 64, 128])
        decoder_channels = list(decoder_channels or [64, 64, 32, 16, 8])
        if image_size % 2**N_BLOCKS:
            raise ValueError(f"vae-small: image_size must be a multiple of {2**N_BLOCKS}, got {image_size}")
        if len(channels) != N_BLOCKS or len(decoder_channels) != N_BLOCKS:
            raise ValueError(f"vae-small: channels and decoder_channels need {N_BLOCKS} entries each")
        super().__init__(image_size=image_size, in_channels=in_channels, latent_dim=latent_dim,
                         channels=channels, decoder_channels=decoder_channels, **extra)
        self.grid = image_size // 2**N_BLOCKS

        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.encoder = nn.Sequential(*layers)
        flat = channels[-1] * self.grid * self.grid
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)

        self.dec_start = decoder_channels[0]
        self.dec_fc = nn.Linear(latent_dim, self.dec_start * self.grid * self.grid)
        layers = [nn.ReLU()]
        c_in = self.dec_start
        for c_out in decoder_channels:
            layers += [nn.Conv2d(c_in, c_out * 4, 3, padding=1), nn.PixelShuffle(2), nn.ReLU()]
            c_in = c_out
        layers += [nn.Conv2d(c_in, in_channels, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_fc(z).view(-1, self.dec_start, self.grid, self.grid)
        return self.decoder(h)

    def hookable_layers(self) -> dict[str, nn.Module]:
        enc_relus = [m for m in self.encoder if isinstance(m, nn.ReLU)]
        dec_relus = [m for m in self.decoder if isinstance(m, nn.ReLU)][1:]
        named: dict[str, nn.Module] = {f"enc{i}": m for i, m in enumerate(enc_relus, 1)}
        named.update(mu=self.mu, logvar=self.logvar)
        named.update({f"dec{i}": m for i, m in enumerate(dec_relus, 1)})
        named["out"] = self.decoder[-1]
        return named


@hookimpl
def fluency_register_architectures() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(
            name="vae-small",
            factory=VAESmall,
            description="Small VGG-like VAE: 5 conv+ReLU+pool encoder blocks, Gaussian latent, 5 PixelShuffle decoder blocks.",
            options={
                "image_size": Option("int", 64, "input height and width (a multiple of 32)", minimum=32),
                "in_channels": Option("int", 3, "image channels (3 = RGB, 1 = grayscale)", choices=(1, 3)),
                "latent_dim": Option("int", 32, "size of the latent Gaussian", minimum=1),
                "channels": Option("list[int]", [16, 32, 64, 64, 128], "channels of the 5 encoder blocks", minimum=1),
                "decoder_channels": Option("list[int]", [64, 64, 32, 16, 8], "channels of the 5 decoder blocks",
                                           minimum=1),
            },
        )
    ]
