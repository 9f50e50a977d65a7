"""The VAE training loss, per image, so metrics can read one image's loss alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fluency.core.architecture import VAEOutput
from fluency.core.errors import FluencyError

RECONSTRUCTION = ("mse", "l1")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag e^logvar) ‖ N(0, I)) per image: −½ Σ (1 + lv − mu² − e^lv)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=tuple(range(1, mu.dim())))


def reconstruction_error(recon: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image reconstruction error summed over pixels: ``mse`` (squared) or ``l1`` (absolute)."""
    diff = recon - images
    if kind == "mse":
        err = diff.pow(2)
    elif kind == "l1":
        err = diff.abs()
    else:
        raise FluencyError(f"unknown reconstruction loss {kind!r}; use one of {list(RECONSTRUCTION)}")
    return err.flatten(1).sum(dim=1)


def vae_loss_terms(out: VAEOutput, images: torch.Tensor, reconstruction: str = "mse",
                   beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image loss terms ``{"loss", "recon", "kl"}`` with loss = recon + beta·kl (the negative ELBO for beta=1)."""
    recon = reconstruction_error(out.recon, images, reconstruction)
    kl = kl_divergence(out.mu, out.logvar)
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def loss_terms_from_config(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The reconstruction terms of a checkpoint's ``loss`` entry (old ``{"reconstruction": "mse"}`` too)."""
    if "terms" in config:
        return [dict(t) for t in config["terms"]]
    kind = str(config.get("reconstruction", "mse"))
    if kind not in RECONSTRUCTION:
        raise FluencyError(f"unknown reconstruction loss {kind!r}; use one of {list(RECONSTRUCTION)}")
    return [{"name": "l2" if kind == "mse" else "l1", "weight": 1.0, "options": {}}]


class CheckpointLoss:
    """The per-image training loss of a checkpoint: weighted reconstruction terms + β·KL (β after warm-up).

    Calling it gives the total (``f(output, images) -> B``); :meth:`parts` gives every term.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from fluency.core.recon_losses import ReconstructionLoss

        self.recon = ReconstructionLoss(loss_terms_from_config(config))
        self.beta = float(config.get("beta", 1.0))

    def parts(self, out: VAEOutput, images: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self.recon(out.recon, images)
        kl = kl_divergence(out.mu, out.logvar)
        return {"loss": recon + self.beta * kl, "recon": recon, "kl": kl}

    def __call__(self, out: VAEOutput, images: torch.Tensor) -> torch.Tensor:
        return self.parts(out, images)["loss"]


def loss_from_config(config: dict[str, Any]) -> CheckpointLoss:
    """The :class:`CheckpointLoss` described by a checkpoint's ``loss`` entry."""
    return CheckpointLoss(config)
