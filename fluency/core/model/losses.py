"""Image distances and the VAE training loss, per image, so metrics can read one image's loss alone.

:data:`LOSSES` is the one registry of named image distances. Each entry builds a module
``(x̂, x) -> B`` values (one per image), used both as a training loss term (``fluency train
--loss NAME[:WEIGHT]``, weighted and summed by :class:`ReconstructionLoss`) and as a plain
per-image distance (``fluency compare``):

| name | per-image value | notes |
| --- | --- | --- |
| ``l2`` (alias ``mse``) | Σ over pixels of (x̂ − x)² | the Gaussian negative log-likelihood up to constants |
| ``l1`` | Σ over pixels of abs(x̂ − x) | |
| ``ssim`` | 1 − SSIM(x̂, x) | pytorch-msssim, data range 1, 11×11 Gaussian window |
| ``lpips`` | LPIPS(x̂, x) | Zhang et al. 2018; frozen, eval mode, never optimised |
| ``dfc`` | Σ over chosen layers of mean (φ_l(x̂) − φ_l(x))² | Hou et al. 2017, φ = ImageNet VGG16 features |

``l2``/``l1`` are sums over pixels as training losses (``reduction="mean"`` makes them means
over pixels, as ``fluency compare`` reports them) while the others are of order 1, so combine
them with weights, e.g. ``--loss l2 --loss lpips:1000``. The frozen networks of ``lpips`` and
``dfc`` are not submodules of the model, so an optimizer over the model's parameters (or a SAM
perturbation) can never change them.

``mse`` is kept as an alias of ``l2``: checkpoints written before loss terms existed (the
shipped ``default.pt`` among them) describe their loss as ``{"reconstruction": "mse"}`` or
``{"reconstruction": "l1"}``, and :func:`loss_from_config` reads them as the same sums.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fluency.core.errors import FluencyError, OptionError
from fluency.core.plugin.architecture import FluencyModel, ObjectiveSettings
from fluency.core.model.backbones import IMAGENET_MEAN, IMAGENET_STD, LPIPS_OPTIONS
from fluency.core.plugin.options import Option, resolve_options

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
REDUCTIONS = ("sum", "mean")


def _relu_names(cfg: Sequence[Any]) -> dict[str, int]:
    """``{"relu1_1": feature index of that ReLU, ...}`` for a torchvision VGG configuration."""
    names, block, conv, index = {}, 1, 1, 0
    for item in cfg:
        if item == "M":
            block, conv, index = block + 1, 1, index + 1
        else:
            names[f"relu{block}_{conv}"] = index + 1
            conv, index = conv + 1, index + 2
    return names


class _PixelDistance(nn.Module):
    """A pixel-wise error, summed (the training loss) or averaged (``fluency compare``) over each image."""

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise FluencyError(f"unknown reduction {reduction!r}; use one of {list(REDUCTIONS)}")
        self.reduction = reduction

    def error(self, diff: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        err = self.error(recon - images).flatten(1)
        return err.sum(1) if self.reduction == "sum" else err.mean(1)


class L2(_PixelDistance):
    def error(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.pow(2)


class L1(_PixelDistance):
    def error(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.abs()


class SSIMLoss(nn.Module):
    def __init__(self, win_size: int = 11) -> None:
        super().__init__()
        try:
            from pytorch_msssim import ssim
        except ImportError:
            raise FluencyError("the ssim loss needs pytorch-msssim: pip install pytorch-msssim") from None
        self.ssim, self.win_size = ssim, win_size

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return 1 - self.ssim(recon, images, data_range=1.0, size_average=False, win_size=self.win_size)


def _frozen_on(net: nn.Module, device: torch.device) -> nn.Module:
    """The frozen network on ``device``, moved only when it is elsewhere: ``Module.to`` inside
    ``torch.func.vmap`` (SAM's per-image gradients) crashes the process."""
    if any(p.device != device for p in net.parameters()):
        net.to(device)
    return net.eval()


class LPIPSLoss(nn.Module):
    def __init__(self, net: str = "alex", weights: str | None = None) -> None:
        super().__init__()
        from fluency.core.model.backbones import lpips_model

        # kept outside the module tree (a plain attribute in a list) so .parameters(), .train() and
        # state_dict() of any parent never reach it
        self._frozen = [lpips_model(net, weights)]

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        model = _frozen_on(self._frozen[0], images.device)
        return model(recon, images, normalize=True).flatten()


class DFCLoss(nn.Module):
    def __init__(self, layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1"), weights: str | None = None) -> None:
        super().__init__()
        from fluency.core.model.backbones import (ENV_WEIGHTS, hub_file, load_features, read_features_state_dict,
                                                  weights_source)

        names = _relu_names(VGG16_CFG)
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise OptionError(f"loss dfc: unknown layers {unknown}; use some of {list(names)}")
        modules: list[nn.Module] = []
        convs: dict[int, nn.Module] = {}
        c_in = 3
        for item in VGG16_CFG:
            if item == "M":
                modules.append(nn.MaxPool2d(2))
            else:
                convs[len(modules)] = conv = nn.Conv2d(c_in, int(item), 3, padding=1)
                modules += [conv, nn.ReLU()]
                c_in = int(item)
        source, label = weights_source(weights, "FLUENCY_DFC_WEIGHTS", ENV_WEIGHTS)
        if source is None and hub_file("vgg").exists():
            source = label = str(hub_file("vgg"))
        if source is None:
            raise FluencyError(f"loss dfc needs ImageNet VGG16 weights: place torchvision's file at {hub_file('vgg')} "
                               "or pass -o dfc.weights=PATH (a torchvision VGG16 state dict, full or features-only)")
        load_features(convs, read_features_state_dict(source, label), label)
        last = max(names[name] for name in layers)
        features = nn.Sequential(*modules[: last + 1]).eval()
        for p in features.parameters():
            p.requires_grad_(False)
        self._frozen = [features]
        self.taps = sorted(names[name] for name in layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = _frozen_on(self._frozen[0], x.device)
        # .to: a CheckpointLoss is never moved as a whole, so its buffers may still be on the CPU
        h, out = (x - self.mean.to(x.device)) / self.std.to(x.device), []
        for i, module in enumerate(net):
            h = module(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if recon.shape[1] == 1:
            recon, images = recon.expand(-1, 3, -1, -1), images.expand(-1, 3, -1, -1)
        with torch.no_grad():
            target = self._features(images)
        return sum((a - b).pow(2).flatten(1).mean(1) for a, b in zip(self._features(recon), target))


@dataclass(frozen=True)
class LossSpec:
    """A named image distance: :meth:`build` gives a module ``(x̂, x) -> B`` values, typed options."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    options: Mapping[str, Option] = field(default_factory=dict)
    pixelwise: bool = False  # a sum over pixels, or with reduction="mean" a mean over pixels

    def build(self, options: Mapping[str, Any] | None = None, *, reduction: str = "sum") -> nn.Module:
        """The distance with ``options`` validated.

        ``reduction`` (``sum``, the training loss, or ``mean``) is how a pixel-wise distance (l1, l2)
        goes over an image's pixels; the others are one value of order 1 per image either way.
        """
        resolved = resolve_options(self.options, [dict(options or {})], f"loss {self.name!r}")
        return self.factory(reduction=reduction, **resolved) if self.pixelwise else self.factory(**resolved)


LOSSES: dict[str, LossSpec] = {
    "l2": LossSpec("l2", L2, "squared error summed over pixels", pixelwise=True),
    "l1": LossSpec("l1", L1, "absolute error summed over pixels", pixelwise=True),
    "ssim": LossSpec("ssim", SSIMLoss, "1 − SSIM (pytorch-msssim)",
                     {"win_size": Option("int", 11, "Gaussian window size (odd)", minimum=3)}),
    "lpips": LossSpec("lpips", LPIPSLoss, "LPIPS distance (Zhang et al. 2018), frozen backbone",
                      LPIPS_OPTIONS),
    "dfc": LossSpec("dfc", DFCLoss, "deep feature consistency (Hou et al. 2017) on ImageNet VGG16 features",
                    {"layers": Option("list[str]", ["relu1_1", "relu2_1", "relu3_1"], "VGG16 ReLU layers"),
                     "weights": Option("str", None, "local torchvision VGG16 state dict (full or features-only)")}),
}
#: ``mse``: the name of ``l2`` in checkpoints written before loss terms (``{"reconstruction": "mse"}``,
#: the shipped default.pt); ``--loss mse`` is accepted too
ALIASES = {"mse": "l2"}
#: what the ``reconstruction`` entry of such a checkpoint could hold
LEGACY_RECONSTRUCTION = ("mse", "l1")


def parse_loss_terms(terms: Sequence[str]) -> list[tuple[str, float]]:
    """``["l2", "lpips:1000"]`` → ``[("l2", 1.0), ("lpips", 1000.0)]``; unknown names are an error."""
    out: list[tuple[str, float]] = []
    for term in terms or ["l2"]:
        name, _, weight = term.partition(":")
        name = ALIASES.get(name.strip(), name.strip())
        if name not in LOSSES:
            raise OptionError(f"--loss {term!r}: unknown loss; use one of {sorted(LOSSES)} (NAME or NAME:WEIGHT)")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise OptionError(f"--loss {term!r}: the weight after ':' must be a number") from None
        out.append((name, value))
    return out


class ReconstructionLoss(nn.Module):
    """Σ_k w_k · loss_k(recon, images), per image, from ``[{"name", "weight", "options"}, ...]``."""

    def __init__(self, terms: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.terms = [dict(t) for t in terms]
        self.losses = nn.ModuleList(LOSSES[ALIASES.get(t["name"], t["name"])].build(t.get("options", {}))
                                    for t in self.terms)

    def components(self, recon: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's unweighted per-image value, by name."""
        return {t["name"]: loss(recon, images) for t, loss in zip(self.terms, self.losses)}

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        parts = self.components(recon, images)
        return sum(float(t["weight"]) * parts[t["name"]] for t in self.terms)


def loss_terms_from_config(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reconstruction terms of a checkpoint's ``loss`` entry (old ``{"reconstruction": "mse"}`` too)."""
    if "terms" in config:
        return [dict(t) for t in config["terms"]]
    kind = str(config.get("reconstruction", "mse"))
    if kind not in LEGACY_RECONSTRUCTION:
        raise FluencyError(f"unknown reconstruction loss {kind!r}; use one of {list(LEGACY_RECONSTRUCTION)}")
    return [{"name": ALIASES.get(kind, kind), "weight": 1.0, "options": {}}]


class LossUnavailable(FluencyError):
    """A checkpoint's training loss cannot be built here (e.g. LPIPS weights missing offline)."""


class CheckpointLoss:
    """The per-image training objective of a checkpoint's model, as its training run configured it.

    Calling it gives the total (``f(output, images) -> B``); :meth:`parts` gives every term the
    architecture's :meth:`~fluency.core.plugin.architecture.FluencyModel.objective` returns (for a VAE
    ``loss``, ``recon`` and ``kl``). The reconstruction losses (LPIPS, say, with its weights) are built on
    first use, so measuring a checkpoint with activation metrics never needs them.
    """

    def __init__(self, model: FluencyModel, config: Mapping[str, Any], label: str = "") -> None:
        self.model, self.config, self.label = model, dict(config), label
        self._settings: ObjectiveSettings | None = None

    @property
    def settings(self) -> ObjectiveSettings:
        """The objective's settings, building the reconstruction losses the first time (VAEs only)."""
        if self._settings is None:
            beta = float(self.config.get("beta", 1.0))
            if "decoder" in self.model.provides:
                terms = loss_terms_from_config(self.config)
                recon = self._built(terms)
                self._settings = ObjectiveSettings(recon.components, {t["name"]: float(t["weight"]) for t in terms},
                                                   beta)
            else:
                self._settings = ObjectiveSettings(beta=beta)
        return self._settings

    def build(self) -> CheckpointLoss:
        """Build the loss now (e.g. before ``torch.func.vmap``, which refuses the random initialisation of a
        backbone built inside it); :class:`LossUnavailable` when it cannot be built here."""
        _ = self.settings
        return self

    def _built(self, terms: Sequence[Mapping[str, Any]]) -> ReconstructionLoss:
        """The reconstruction losses, or :class:`LossUnavailable` naming the checkpoint and its loss terms."""
        try:
            return ReconstructionLoss(terms)
        except FluencyError as exc:
            names = " + ".join(str(t["name"]) for t in terms)
            raise LossUnavailable(f"the training loss of checkpoint {self.label or '?'} ({names}), which cannot be "
                                  f"built here: {exc} (the loss is built from the options it was trained with "
                                  "and environment variables; this command's -o options do not reach it)") from None

    def parts(self, out: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every per-image term of the objective, ``loss`` the total."""
        return self.model.objective(out, images, self.settings)

    def __call__(self, out: Any, images: torch.Tensor) -> torch.Tensor:
        return self.parts(out, images)["loss"]


def loss_from_config(model: FluencyModel, config: Mapping[str, Any], label: str = "") -> CheckpointLoss:
    """The :class:`CheckpointLoss` of ``model`` described by its checkpoint's ``loss`` entry (``label`` names the
    checkpoint in errors)."""
    return CheckpointLoss(model, config, label)
