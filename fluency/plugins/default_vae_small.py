"""Architecture ``vae-small``: a small VGG-like VAE, the default brain model.

Encoder: five blocks conv3×3 → ReLU → max-pool 2×2 (no residual connections, as in
VGG). Latent: fully connected ``mu`` and ``logvar`` with the reparameterisation trick.
Decoder: a fully connected layer to a 2^k grid, then five blocks conv3×3 →
PixelShuffle(2) → ReLU, and a 3×3 convolution with a sigmoid to pixels in [0, 1].
Hookable layers: ``enc1``…``enc5`` (post-ReLU feature maps, before pooling), ``mu``,
``logvar``, ``dec1``…``dec5`` and ``out``.

Configurable without code (all defaults reproduce the layout above and the state-dict
keys of the shipped checkpoint): per-block ``norm``, ``separable`` and
``spectral_norm`` convolutions, a convolutional ``latent`` head, the decoder's
``upsampling``, and CBAM channel ``attention`` after chosen encoder blocks — ``attention
= ["enc3"]`` adds the hookable layer ``att3``, the B×C attention weights (listed by
:meth:`VAESmall.attention_layers`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fluency import ArchitectureSpec, Option, hookimpl
from fluency.blocks import (LATENTS, MAX_CHANNELS, MAX_IMAGE_SIZE, MAX_LATENT_DIM, ArchitectureConfigError, BlockVAE,
                            attention_stages, block_options, build_decoder, build_encoder, check_choice,
                            check_image_size, per_block)

N_BLOCKS = 5
BLOCK_NAMES = tuple(f"enc{i}" for i in range(1, N_BLOCKS + 1))


class VAESmall(BlockVAE):
    """The ``vae-small`` model; see the module docstring."""

    default_metric_layers: ClassVar[tuple[str, ...]] = BLOCK_NAMES

    def __init__(self, image_size: int = 64, in_channels: int = 3, latent_dim: int = 32,
                 channels: list[int] | None = None, decoder_channels: list[int] | None = None,
                 latent: str = "fc", upsampling: str = "pixelshuffle", norm: str | list[str] | None = None,
                 decoder_norm: str = "none", separable: bool = False, spectral_norm: bool = False,
                 attention: list[str] | None = None, attention_gate: str = "sigmoid",
                 attention_temperature: float = 1.0, attention_reduction: int = 16, **extra: Any) -> None:
        channels = list(channels or [16, 32, 64, 64, 128])
        decoder_channels = list(decoder_channels or [64, 64, 32, 16, 8])
        grid = check_image_size("vae-small", image_size, N_BLOCKS)
        if len(channels) != N_BLOCKS or len(decoder_channels) != N_BLOCKS:
            raise ArchitectureConfigError(f"vae-small: channels and decoder_channels need {N_BLOCKS} entries each")
        norms = per_block(norm, N_BLOCKS, "vae-small norm")
        stages = attention_stages(attention, N_BLOCKS)
        super().__init__(image_size=image_size, in_channels=in_channels, latent_dim=latent_dim,
                         channels=channels, decoder_channels=decoder_channels,
                         latent=check_choice(latent, LATENTS, "latent"), upsampling=upsampling, norm=norms,
                         decoder_norm=decoder_norm, separable=bool(separable), spectral_norm=bool(spectral_norm),
                         attention=[BLOCK_NAMES[s] for s in stages], attention_gate=attention_gate,
                         attention_temperature=float(attention_temperature),
                         attention_reduction=int(attention_reduction), **extra)
        enc = build_encoder(in_channels, [[c] for c in channels], norms, bool(separable), bool(spectral_norm),
                            stages, attention_gate, float(attention_temperature), int(attention_reduction))
        names: dict[str, int] = {}
        for s in range(N_BLOCKS):
            names[BLOCK_NAMES[s]] = enc.relus[s][-1]
            if s in enc.attention:
                names[f"att{s + 1}"] = enc.attention[s]
        dec = build_decoder(latent_dim, decoder_channels, in_channels, grid, upsampling, decoder_norm)
        self._assemble(enc, names, latent, latent_dim, dec)


def small_options() -> dict[str, Option]:
    """The typed options of ``vae-small``."""
    return {
        "image_size": Option("int", 64, "input height and width (a multiple of 32)", minimum=32,
                             maximum=MAX_IMAGE_SIZE),
        "in_channels": Option("int", 3, "image channels (3 = RGB, 1 = grayscale)", choices=(1, 3)),
        "latent_dim": Option("int", 32, "size of the latent Gaussian", minimum=1, maximum=MAX_LATENT_DIM),
        "channels": Option("list[int]", [16, 32, 64, 64, 128], "channels of the 5 encoder blocks", minimum=1,
                           maximum=MAX_CHANNELS),
        "decoder_channels": Option("list[int]", [64, 64, 32, 16, 8], "channels of the 5 decoder blocks",
                                   minimum=1, maximum=MAX_CHANNELS),
        **block_options(BLOCK_NAMES),
    }




@hookimpl
def fluency_register_architectures() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(
            name="vae-small",
            factory=VAESmall,
            description="Small VGG-like VAE: 5 conv+ReLU+pool encoder blocks, Gaussian latent, 5 PixelShuffle decoder blocks.",
            options=small_options(),
        )
    ]
