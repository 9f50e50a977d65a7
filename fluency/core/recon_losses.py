"""Reconstruction losses for training, each per image, combined as a weighted sum.

| name | per-image value | notes |
| --- | --- | --- |
| ``l2`` (alias ``mse``) | Σ over pixels of (x̂ − x)² | the Gaussian negative log-likelihood up to constants |
| ``l1`` | Σ over pixels of abs(x̂ − x) | |
| ``ssim`` | 1 − SSIM(x̂, x) | pytorch-msssim, data range 1, 11×11 Gaussian window |
| ``lpips`` | LPIPS(x̂, x) | Zhang et al. 2018; frozen, eval mode, never optimised |
| ``dfc`` | Σ over chosen layers of mean (φ_l(x̂) − φ_l(x))² | Hou et al. 2017, φ = ImageNet VGG16 features |

``l2``/``l1`` are sums over pixels while the others are of order 1, so combine them with
weights, e.g. ``--loss l2 --loss lpips:1000``. The frozen networks of ``lpips`` and
``dfc`` are not submodules of the model, so an optimizer over the model's parameters
(or a SAM perturbation) can never change them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fluency.core.errors import FluencyError, OptionError
from fluency.core.options import Option, resolve_options

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class L2(nn.Module):
    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return (recon - images).pow(2).flatten(1).sum(1)


class L1(nn.Module):
    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return (recon - images).abs().flatten(1).sum(1)


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


class LPIPSLoss(nn.Module):
    def __init__(self, net: str = "alex", weights: str | None = None) -> None:
        super().__init__()
        from fluency.core.backbones import lpips_model

        # kept outside the module tree (a plain attribute in a list) so .parameters(), .train() and
        # state_dict() of any parent never reach it
        self._frozen = [lpips_model(net, weights)]

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        model = self._frozen[0].to(images.device).eval()
        return model(recon, images, normalize=True).flatten()


class DFCLoss(nn.Module):
    def __init__(self, layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1"), weights: str | None = None) -> None:
        super().__init__()
        from fluency.core.backbones import ENV_WEIGHTS, hub_file, load_features, read_features_state_dict

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
        import os

        source = weights or os.environ.get("FLUENCY_DFC_WEIGHTS") or os.environ.get(ENV_WEIGHTS)
        if source is None and hub_file("vgg").exists():
            source = str(hub_file("vgg"))
        if source is None:
            raise FluencyError(f"loss dfc needs ImageNet VGG16 weights: place torchvision's file at {hub_file('vgg')} "
                               "or pass -o dfc.weights=PATH (a torchvision VGG16 state dict, full or features-only)")
        load_features(convs, read_features_state_dict(source), source)
        last = max(names[name] for name in layers)
        features = nn.Sequential(*modules[: last + 1]).eval()
        for p in features.parameters():
            p.requires_grad_(False)
        self._frozen = [features]
        self.taps = sorted(names[name] for name in layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self._frozen[0].to(x.device).eval()
        h, out = (x - self.mean) / self.std, []
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
    """A reconstruction loss: name, factory(**options) → module(recon, images) → B, typed options."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    options: Mapping[str, Option] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {
    "l2": LossSpec("l2", L2, "squared error summed over pixels"),
    "l1": LossSpec("l1", L1, "absolute error summed over pixels"),
    "ssim": LossSpec("ssim", SSIMLoss, "1 − SSIM (pytorch-msssim)",
                     {"win_size": Option("int", 11, "Gaussian window size (odd)", minimum=3)}),
    "lpips": LossSpec("lpips", LPIPSLoss, "LPIPS distance (Zhang et al. 2018), frozen backbone",
                      {"net": Option("str", "alex", "backbone", choices=("alex", "vgg", "squeeze")),
                       "weights": Option("str", None, "local torchvision state dict of the backbone "
                                         "(default: $FLUENCY_LPIPS_WEIGHTS or torchvision's cache)")}),
    "dfc": LossSpec("dfc", DFCLoss, "deep feature consistency (Hou et al. 2017) on ImageNet VGG16 features",
                    {"layers": Option("list[str]", ["relu1_1", "relu2_1", "relu3_1"], "VGG16 ReLU layers"),
                     "weights": Option("str", None, "local torchvision VGG16 state dict (full or features-only)")}),
}
ALIASES = {"mse": "l2"}


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
        self.losses = nn.ModuleList()
        for t in self.terms:
            spec = LOSSES[ALIASES.get(t["name"], t["name"])]
            options = resolve_options(spec.options, [t.get("options", {})], f"loss {spec.name!r}")
            self.losses.append(spec.factory(**options))

    def components(self, recon: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's unweighted per-image value, by name."""
        return {t["name"]: loss(recon, images) for t, loss in zip(self.terms, self.losses)}

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        parts = self.components(recon, images)
        return sum(float(t["weight"]) * parts[t["name"]] for t in self.terms)
