"""ImageNet backbones for perceptual losses and metrics (LPIPS, DFC), online or offline.

The ``lpips`` package ships only its linear heads and asks torchvision for the
ImageNet backbone, which torchvision downloads once into its hub cache
(``torch.hub.get_dir()/checkpoints``). On machines without internet (CI, most HPC
compute nodes) the backbone can come from a local torchvision state dict instead —
a full checkpoint (``features.N.weight``, ``classifier...``) or features only
(``features.N.weight`` or ``N.weight``) — given by an option or by the environment
variable ``FLUENCY_LPIPS_WEIGHTS``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluency.core.errors import FluencyError
from fluency.core.plugin.options import Option

#: torchvision's file names in its hub cache, per backbone
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                     "squeeze": "squeezenet1_1-b8a52dc0.pth"}
ENV_WEIGHTS = "FLUENCY_LPIPS_WEIGHTS"


def hub_file(net: str) -> Path:
    """Where torchvision caches the ImageNet weights of ``net``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[net]


def weights_source(weights: str | Path | None, *variables: str) -> tuple[str | None, str]:
    """The backbone weights file to use, from ``weights`` (an option) or the first set environment variable,
    and how to name it in messages (``PATH`` or ``PATH (from $VARIABLE)``)."""
    if weights:
        return str(weights), str(weights)
    for variable in variables:
        if os.environ.get(variable):
            return os.environ[variable], f"{os.environ[variable]} (from ${variable})"
    return None, ""


def read_features_state_dict(path: str | Path, label: str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """``{feature index: {"weight": ..., "bias": ...}}`` from a full or features-only torchvision state dict;
    anything else is a :class:`FluencyError` naming the file as ``label`` (default: the path)."""
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise FluencyError(f"backbone weights {label}: no such file (expected a torchvision state dict of the "
                           "network's `features`, full or features-only)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FluencyError(f"backbone weights {label}: cannot be read safely ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FluencyError(f"backbone weights {label}: holds a {type(state).__name__}, not a state dict (parameter "
                           "names to tensors) of a torchvision AlexNet/VGG")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".") if isinstance(key, str) else []
        if parts and parts[0] == "features":
            parts = parts[1:]
        if len(parts) == 2 and parts[0].isdigit() and parts[1] in ("weight", "bias"):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise FluencyError(f"backbone weights {label}: {key} is a {type(value).__name__}, not a float "
                                   "tensor; is it a torchvision state dict?")
            out.setdefault(int(parts[0]), {})[parts[1]] = value
    if not out:
        raise FluencyError(f"backbone weights {label}: no `features.N.weight` entries; is it a torchvision "
                           "AlexNet/VGG state dict?")
    return out


def load_features(modules: dict[int, nn.Module], weights: dict[int, dict[str, torch.Tensor]], source: str) -> None:
    """Copy ``weights`` into ``modules`` (feature index → conv module); every conv must be covered."""
    missing = sorted(f"features.{i}.{name}" for i in modules for name in ("weight", "bias")
                     if name not in weights.get(i, {}))
    if missing:
        raise FluencyError(f"backbone weights {source}: no entries {missing[:6]} (wrong network?)")
    with torch.no_grad():
        for index, module in modules.items():
            for name in ("weight", "bias"):
                target, value = getattr(module, name), weights[index][name]
                if target.shape != value.shape:
                    raise FluencyError(f"backbone weights {source}: features.{index}.{name} has shape "
                                       f"{tuple(value.shape)}, expected {tuple(target.shape)} (wrong network?)")
                target.copy_(value)


#: ImageNet's per-channel mean and standard deviation (RGB), which torchvision's ImageNet weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the options of an LPIPS distance wherever one is used (the ``lpips`` metric, ``fluency compare``, the
#: ``lpips`` training loss): declared once, here
LPIPS_OPTIONS: dict[str, Option] = {
    "net": Option("str", "alex", "backbone", choices=("alex", "vgg", "squeeze")),
    "weights": Option("str", None, "local torchvision state dict of the backbone (full or features-only); default: "
                      "$FLUENCY_LPIPS_WEIGHTS, then torchvision's cache or download"),
}


def lpips_model(net: str = "alex", weights: str | Path | None = None, version: str = "0.1") -> nn.Module:
    """A frozen, eval-mode ``lpips.LPIPS``; the backbone from ``weights``, ``$FLUENCY_LPIPS_WEIGHTS``,
    torchvision's cache, or a download, in that order; a clear error when none works."""
    try:
        import lpips
    except ImportError:
        raise FluencyError("LPIPS needs the `lpips` package (and torchvision): pip install lpips") from None
    weights, label = weights_source(weights, ENV_WEIGHTS)
    local = weights is None and hub_file(net).exists()
    kwargs: dict[str, Any] = dict(pretrained=True, net=net, version=version, verbose=False)
    if weights is not None:
        state = read_features_state_dict(weights, label)  # first: a bad file fails before the network is built
        with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(pnet_rand=True, **kwargs)
        slices = {int(name): module for i in range(1, model.net.N_slices + 1)
                  for name, module in getattr(model.net, f"slice{i}").named_children()
                  if isinstance(module, nn.Conv2d)}
        load_features(slices, state, label)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model = lpips.LPIPS(pnet_rand=False, **kwargs)
        except Exception as exc:  # offline: URLError or similar from torchvision's download
            if local:
                raise
            raise FluencyError(
                f"LPIPS ({net}) needs ImageNet backbone weights and none could be downloaded ({type(exc).__name__}). "
                f"Either place torchvision's file at {hub_file(net)}, or point -o lpips.weights=PATH (or "
                f"{ENV_WEIGHTS}=PATH) at a torchvision {'AlexNet' if net == 'alex' else net.upper()} state dict "
                "(full or features-only)") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
