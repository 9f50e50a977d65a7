"""The contract of an Architecture plugin: a VAE with named, hookable layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class VAEOutput:
    """What a forward pass returns: the reconstruction and the latent Gaussian."""

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


class FluencyVAE(nn.Module):
    """Base class of fluency models.

    Subclasses build their modules in ``__init__(**options)``, store the options in
    ``self.options`` (they are saved in checkpoints to rebuild the model), and
    implement :meth:`encode`, :meth:`decode` and :meth:`hookable_layers`.
    Images are ``B×C×H×W`` floats in [0, 1]; reconstructions too.
    """

    #: layers read by activation metrics when the user names none
    default_metric_layers: ClassVar[tuple[str, ...]] = ()
    #: name prefixes of the encoder's parameters (for metrics restricted to the encoder)
    encoder_prefixes: ClassVar[tuple[str, ...]] = ("encoder.",)

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options: dict[str, Any] = dict(options)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mu, logvar)`` of the latent Gaussian."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of latent ``z``."""
        raise NotImplementedError

    def hookable_layers(self) -> dict[str, nn.Module]:
        """Named modules whose outputs are the model's layers, in forward order."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` the model expects."""
        size = int(self.options["image_size"])
        return (int(self.options.get("in_channels", 3)), size, size)

    def encoder_parameters(self) -> dict[str, nn.Parameter]:
        """The encoder's named parameters (those under :attr:`encoder_prefixes`)."""
        return {n: p for n, p in self.named_parameters() if n.startswith(self.encoder_prefixes)}

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        """Encode, draw ``z`` (or take ``z = mu`` when ``sample`` is false) and decode."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return VAEOutput(self.decode(z), mu, logvar, z)


def require_attention_layers(model: object, who: str) -> list[str]:
    """The model's attention layers (``model.attention_layers()``), or an error naming ``who`` needs them."""
    from fluency.core.errors import FluencyError

    method = getattr(model, "attention_layers", None)
    names = list(method()) if callable(method) else []
    if not names:
        raise FluencyError(f"{who}: this architecture has no attention layers; build it with attention, "
                           'e.g. -o vae-small.attention=["enc3"]')
    return names
