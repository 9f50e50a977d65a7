"""The contract of an Architecture plugin: a model with named, hookable layers, of one of three kinds.

- :class:`FluencyVAE` (``kind="vae"``): encoder, latent Gaussian, decoder; trained on the negative
  ELBO (reconstruction + β·KL);
- :class:`FluencyFlow` (``kind="flow"``): an invertible normalising flow; trained on the exact
  negative log-likelihood in bits per dimension;
- :class:`FluencyEncoder` (``kind="encoder"``): an encoder only (a pretrained network, used as it is, or a
  model fitted in one pass, such as a sparse-coding dictionary).

Every kind says what it ``provides`` (``CAPABILITIES``); a metric that needs a decoder, a latent code,
a training objective or an inverse declares it in its spec (``MetricSpec.requires``) and gets one clear line on a model without it. Training asks the model for its :meth:`FluencyModel.objective`, or, for a model
that declares :attr:`FluencyModel.fitted_in_one_pass` (e.g. a dictionary learned with scikit-learn), calls its
:meth:`FluencyModel.fit` once instead of running gradient epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn



@dataclass(frozen=True)
class ObjectiveSettings:
    """How a training run configured the objective; read by the kinds that use it.

    ``reconstruction(recon, images)`` gives each reconstruction term's unweighted per-image value by
    name and ``weights`` their weights (a VAE's reconstruction loss); ``beta`` weighs a VAE's KL term.
    A flow's objective (its exact likelihood) needs none of them.
    """

    reconstruction: Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]] | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    beta: float = 1.0


@dataclass
class VAEOutput:
    """What a VAE's forward pass returns: the reconstruction and the latent Gaussian."""

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


@dataclass
class FlowOutput:
    """What a flow's forward pass returns: the latent ``z`` (B×…), ``log_likelihood`` (B) and ``dims``, the
    number of input dimensions D.

    ``log_likelihood`` is each image's exact log-likelihood in nats as the flow literature reports it, for
    the image's 8-bit values: log p(x) − D·ln 256, with p the flow's density of ``[0, 1]`` pixels (trained
    with uniform dequantisation noise). The objective's bits per dimension are then the usual ones,
    comparable across flows and papers.
    """

    z: torch.Tensor
    log_likelihood: torch.Tensor
    dims: int


@dataclass
class EncoderOutput:
    """What an encoder-only model's forward pass returns: its last layer's output."""

    features: torch.Tensor


class FluencyModel(nn.Module):
    """Base class of every architecture; subclass one of :class:`FluencyVAE`, :class:`FluencyFlow` or
    :class:`FluencyEncoder`.

    Subclasses build their modules in ``__init__(**options)`` (the options are kept in ``self.options``
    and saved in checkpoints to rebuild the model) and implement :meth:`hookable_layers` and ``forward``.
    Images are ``B×C×H×W`` floats in [0, 1].
    """

    #: ``"vae"``, ``"flow"`` or ``"encoder"``
    kind: ClassVar[str] = ""
    #: the capabilities (among ``fluency.core.plugin.specs.CAPABILITIES``) this kind of model offers to metrics
    provides: ClassVar[frozenset[str]] = frozenset()
    #: layers read by activation metrics when the user names none
    default_metric_layers: ClassVar[tuple[str, ...]] = ()
    #: name prefixes of the encoder's parameters (for metrics restricted to the encoder)
    encoder_prefixes: ClassVar[tuple[str, ...]] = ("encoder.",)
    #: true for a model that ``fluency train`` fits in one pass over the training images (:meth:`fit`) instead
    #: of by gradient steps on its :meth:`objective`
    fitted_in_one_pass: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options: dict[str, Any] = dict(options)

    def hookable_layers(self) -> dict[str, nn.Module]:
        """Named modules whose outputs (tensors) are the model's layers, in forward order."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, int | None, int | None]:
        """``(channels, height, width)`` the model expects; height and width None: images at their own size
        (a fully convolutional model; the images of a run must then be of one size)."""
        size = int(self.options["image_size"])
        return (int(self.options.get("in_channels", 3)), size, size)

    def weights_origin(self) -> dict[str, str] | None:
        """Where a model built without a checkpoint got its weights (a pretrained network): ``{"file": path,
        "sha256": hex digest}``, which identifies it in a run's tables and provenance; None otherwise."""
        return None

    def encoder_parameters(self) -> dict[str, nn.Parameter]:
        """The encoder's named parameters (those under :attr:`encoder_prefixes`)."""
        return {n: p for n, p in self.named_parameters() if n.startswith(self.encoder_prefixes)}

    def latent(self, output: Any) -> torch.Tensor | None:
        """The latent code of each image (B×…) in a forward pass's output, or None for a model without one."""
        return None

    def latent_code(self, x: torch.Tensor) -> torch.Tensor:
        """The latent code of images ``x`` (B×…), as cheaply as the kind allows (a VAE skips its decoder)."""
        code = self.latent(self(x, sample=False))
        if code is None:
            raise NotImplementedError(f"{type(self).__name__} ({self.kind or 'model'}) has no latent code")
        return code

    def objective(self, output: Any, images: torch.Tensor, settings: ObjectiveSettings) -> dict[str, torch.Tensor]:
        """The training objective's terms per image (each of shape B) for a forward pass's ``output`` on
        ``images``; ``"loss"`` is the total that training minimises. Models without ``"objective"`` in
        :attr:`provides` are not trained."""
        raise NotImplementedError(f"{type(self).__name__} ({self.kind or 'model'}) has no training objective")

    def fit(self, batches: Iterable[torch.Tensor], held_out: Iterable[torch.Tensor], seed: int,
            status: Callable[[str], None]) -> dict[str, float]:
        """Fit a model that sets :attr:`fitted_in_one_pass`, in one pass over the training images.

        ``fluency train`` calls it once instead of running epochs, then saves the checkpoint: everything
        learned must be in the state dict (parameters or buffers). ``batches`` yields the training images once, in a fixed order (B×C×H×W in [0, 1], on the model's
        device); ``held_out`` the validation images, never to be fitted on; ``seed`` (the run's ``--seed``)
        seeds every random choice; ``status(text)`` shows progress beside the bar that follows ``batches``.
        Returns the numbers of the training history's one row (those measured on ``held_out`` as ``val_…``)."""
        raise NotImplementedError(f"{type(self).__name__} ({self.kind or 'model'}) is not fitted in one pass")


class FluencyVAE(FluencyModel):
    """A variational autoencoder: implement :meth:`encode`, :meth:`decode` and :meth:`hookable_layers`.

    Its objective is the negative ELBO per image: Σ_k w_k · recon_k + β · KL(q(z|x) ‖ N(0, I)), with the
    reconstruction terms and β the training run chose (:class:`ObjectiveSettings`).
    """

    kind: ClassVar[str] = "vae"
    provides: ClassVar[frozenset[str]] = frozenset({"decoder", "latent", "objective"})

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mu, logvar)`` of the latent Gaussian."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of latent ``z``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        """Encode, draw ``z`` (or take ``z = mu`` when ``sample`` is false) and decode."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return VAEOutput(self.decode(z), mu, logvar, z)

    def latent(self, output: VAEOutput) -> torch.Tensor:
        """The posterior mean ``mu``."""
        return output.mu

    def latent_code(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean ``mu`` of ``x``, from the encoder alone."""
        return self.encode(x)[0]

    def objective(self, output: VAEOutput, images: torch.Tensor,
                  settings: ObjectiveSettings) -> dict[str, torch.Tensor]:
        """``loss`` = ``recon`` + β·``kl`` per image; with several reconstruction terms also ``recon_<name>``."""
        if settings.reconstruction is None:
            raise ValueError("a VAE's objective needs ObjectiveSettings.reconstruction")
        parts = dict(settings.reconstruction(output.recon, images))
        recon = sum(float(settings.weights.get(k, 1.0)) * v for k, v in parts.items())
        kl = kl_divergence(output.mu, output.logvar)
        terms = {"loss": recon + settings.beta * kl, "recon": recon, "kl": kl}
        terms.update({f"recon_{k}": v for k, v in parts.items()} if len(parts) > 1 else {})
        return terms


class FluencyFlow(FluencyModel):
    """An invertible normalising flow: implement ``forward(x, sample=True) -> FlowOutput``, :meth:`inverse`
    and :meth:`hookable_layers`.

    ``sample`` is accepted for a common call signature and ignored: a flow's forward pass is
    deterministic. Its objective is the exact negative log-likelihood in bits per dimension.
    """

    kind: ClassVar[str] = "flow"
    provides: ClassVar[frozenset[str]] = frozenset({"latent", "objective", "inverse"})

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """The image whose latent is ``z`` (the exact inverse of the forward pass)."""
        raise NotImplementedError

    def latent(self, output: FlowOutput) -> torch.Tensor:
        """The latent ``z``."""
        return output.z

    def objective(self, output: FlowOutput, images: torch.Tensor,
                  settings: ObjectiveSettings) -> dict[str, torch.Tensor]:
        """``loss`` = ``nll_bpd``, −log p(x) / (D · ln 2) per image."""
        bpd = -output.log_likelihood / (output.dims * math.log(2.0))
        return {"loss": bpd, "nll_bpd": bpd}


class FluencyEncoder(FluencyModel):
    """An encoder-only model (e.g. a pretrained ImageNet CNN as a model of the ventral stream): implement
    ``forward(x, sample=True) -> EncoderOutput`` and :meth:`hookable_layers`. It has no decoder, latent
    or objective: it is used as it is, or, if it sets :attr:`fitted_in_one_pass`, fitted by :meth:`fit` (the
    ``sparse-coding`` baseline)."""

    kind: ClassVar[str] = "encoder"
    provides: ClassVar[frozenset[str]] = frozenset()


def kl_terms(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) ‖ N(0, 1)) of every latent dimension: −½ (1 + lv − mu² − e^lv), shaped like ``mu``."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag e^logvar) ‖ N(0, I)) per image: the sum of :func:`kl_terms` over its dimensions."""
    return kl_terms(mu, logvar).sum(dim=tuple(range(1, mu.dim())))


def missing_capabilities(model: object, required: tuple[str, ...] | list[str]) -> list[str]:
    """The capabilities in ``required`` that ``model`` (a model or a class) does not provide."""
    provided = getattr(model, "provides", frozenset())
    return [c for c in required if c not in provided]


def require_attention_layers(model: object, who: str, *, constraint: bool = False) -> list[str]:
    """The model's attention layers (``model.attention_layers()``), or an error naming ``who`` needs them.

    The error's hint is a command that trains a model with attention (and, for a metric, measures it);
    ``constraint=True`` when ``who`` is a training constraint.
    """
    from fluency.core.errors import FluencyError

    method = getattr(model, "attention_layers", None)
    names = list(method()) if callable(method) else []
    if not names:
        arch = getattr(model, "architecture", None)
        which = f" (architecture {arch})" if isinstance(arch, str) else ""
        train = "fluency train --images DIR --out models/att -o 'vae-small.attention=[enc3]'"
        hint = (f"{train} --constraint {who}" if constraint else
                f"{train}, then fluency run --checkpoint models/att/final.pt --metric {who}")
        raise FluencyError(f"{who}: the model{which} has no attention layers; train one with attention, e.g. {hint}")
    return names
