"""Building blocks of architectures, public for plugins: VGG-like conv blocks, CBAM channel attention,
latent heads, decoders, the block-built VAE, and loading ImageNet backbone weights offline.

The built-in ``vae-small``, ``vae-vgg16`` and ``vae-vgg19`` are made of these parts; a third-party
architecture can build from the same ones (see docs/models.md).
"""

from __future__ import annotations

from fluency.core.model.backbones import (IMAGENET_MEAN, IMAGENET_STD, LPIPS_OPTIONS, load_features, lpips_model,
                                          read_features_state_dict)
from fluency.core.model.blocks import (GATES, LATENTS, MAX_CHANNELS, MAX_IMAGE_SIZE, MAX_LATENT_DIM, NORMS,
                                       UPSAMPLINGS, ArchitectureConfigError, BlockVAE,
                                       CBAMChannel, DecoderParts, EncoderParts, attention_stages, block_options,
                                       build_decoder, build_encoder, check_choice, check_image_size, conv_block,
                                       latent_head, per_block, upsampling_layers)

__all__ = [
    "GATES", "LATENTS", "MAX_CHANNELS", "MAX_IMAGE_SIZE", "MAX_LATENT_DIM", "NORMS", "UPSAMPLINGS",
    "ArchitectureConfigError", "BlockVAE", "CBAMChannel",
    "DecoderParts", "EncoderParts", "attention_stages", "block_options", "build_decoder", "build_encoder",
    "check_choice", "check_image_size", "conv_block", "latent_head", "per_block", "upsampling_layers",
    "IMAGENET_MEAN", "IMAGENET_STD", "LPIPS_OPTIONS", "load_features", "lpips_model", "read_features_state_dict",
]
