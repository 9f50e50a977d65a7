"""Constraint ``kl-sparsity``: the sparse-autoencoder KL penalty towards a target mean activation ρ.

For each unit j of a chosen layer, ρ̂_j is its mean (mapped) activation over the batch and::

    KL(ρ ‖ ρ̂_j) = ρ log(ρ / ρ̂_j) + (1 − ρ) log((1 − ρ) / (1 − ρ̂_j))

which is ≥ 0 and 0 only at ρ̂_j = ρ, so its gradient pulls every unit's firing rate
towards ρ (Ng's sparse autoencoder notes; the report cites Pasquet et al. 2019). This is
the standard formula: the report prints ρ log ρ in place of ρ log(ρ/ρ̂_j), a version that
can be negative and is minimised at ρ̂ → 0 whatever ρ, i.e. not a target at all.

A *unit* is one element of an image's activation (``unit="element"``, the classic
definition) or one channel (``unit="channel"``: ρ̂ averages over batch *and* space, so a
feature map is a unit whatever its position, as for convolutional sparse coding).

ρ̂ must lie in (0, 1); ``mapping`` says how activations get there:

* ``sigmoid`` — ρ̂ = mean σ(x). Smooth, gradient everywhere, right for signed
  (pre-activation) layers. On ReLU outputs (x ≥ 0) σ(x) ≥ ½, so ρ̂ ≥ ½: any ρ < ½ is
  out of reach, the penalty never reaches 0 (its floor is KL(ρ‖½), 0.4946 per unit at
  ρ = 0.05) and it merely pushes every activation to 0. On ReLU layers use ``tanh``,
  or read ρ as a target for σ(x), i.e. choose ρ > ½.
* ``tanh`` (default: the encoder blocks fluency constrains are ReLU outputs) — ρ̂ = mean
  tanh(x), for non-negative (post-ReLU) layers: it maps 0 → 0 and
  (0, ∞) → (0, 1), so ρ keeps its meaning of a firing rate (the fraction of "on" units)
  and ρ̂ = ρ is reachable. On signed layers tanh(x) < 0 and ρ̂ can leave (0, 1).
* ``clamp`` — ρ̂ = mean clamp(x, ε, 1 − ε): the identity for layers already in [0, 1]
  (sigmoid or attention gates), the exact formula on them. Elements outside [ε, 1 − ε]
  get no gradient: ReLU zeros stay put and values above 1 are not pushed down.

Whatever the mapping, ρ̂ is finally clamped to [ε, 1 − ε] so the logarithms stay finite
(a unit silent over a whole batch, or σ underflowing in float32); a clamped ρ̂ passes no
gradient.

``reduction`` combines units within a layer: ``sum`` (default) is the formula above, as in
the literature and the report, so θ values carry over; its size grows with the number of
units (a 32×32×32 layer has 64× the units of a 512-unit one, and the image size changes
it), so θ must be re-tuned per layer and image size. ``mean`` divides by the number of
units, making θ comparable across layers and image sizes. Layers are always summed.

Training logs the mean mapped activation of each constrained layer (mean tanh(x), σ(x) or the clamp; the
average of ρ̂_j over units) and ``fluency run`` warns when it is above 2ρ over the stimuli: the constraint did
not take effect (the study found that instance normalisation prevented it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fluency import ConstraintSpec, Option, hookimpl
from fluency.api import Constraint, FluencyError, FluencyVAE, OptionError, require_layers, weight_option

MAPPINGS = ("sigmoid", "tanh", "clamp")
UNITS = ("element", "channel")
REDUCTIONS = ("sum", "mean")


def kl_bernoulli(rho: float, rho_hat: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(ρ ‖ ρ̂) between Bernoulli(ρ) and Bernoulli(ρ̂); ρ̂ must lie in (0, 1)."""
    return rho * torch.log(rho / rho_hat) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - rho_hat))




class KLSparsity(Constraint):
    """Σ over chosen layers and units of KL(ρ ‖ ρ̂_j); see the module docstring for the options."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.rho = float(self.options.get("rho", 0.05))
        self.eps = float(self.options.get("eps", 1e-6))
        self.mapping = self.options.get("mapping") or "tanh"
        self.unit = self.options.get("unit") or "element"
        self.reduction = self.options.get("reduction") or "sum"
        self.target = self.rho
        self.activity = {"sigmoid": "mean σ(x)", "tanh": "mean tanh(x)", "clamp": "mean clamp(x, ε, 1 − ε)"}.get(
            self.mapping, self.mapping)
        if not 0.0 < self.rho < 1.0:
            raise OptionError(f"kl-sparsity: rho must lie strictly between 0 and 1, got {self.rho}")
        if not 0.0 < self.eps < 0.5:
            raise OptionError(f"kl-sparsity: eps must lie strictly between 0 and 0.5, got {self.eps}")
        for key, value, allowed in (("mapping", self.mapping, MAPPINGS), ("unit", self.unit, UNITS),
                                    ("reduction", self.reduction, REDUCTIONS)):
            if value not in allowed:
                raise OptionError(f"kl-sparsity: {key}={value!r}: use one of {list(allowed)}")

    def mapped(self, x: torch.Tensor) -> torch.Tensor:
        """The activations mapped into (0, 1) by ``mapping`` (float32 at least)."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # logs of values near ε need more than half precision
        if self.mapping == "sigmoid":
            return torch.sigmoid(x)
        if self.mapping == "tanh":
            return torch.tanh(x)
        return x.clamp(self.eps, 1.0 - self.eps)

    def mean_activation(self, x: torch.Tensor) -> float:
        """The mean mapped activation of the batch (ρ̂ averaged over units), the value compared with ρ."""
        return float(self.mapped(x.detach()).mean())

    def rho_hat(self, x: torch.Tensor) -> torch.Tensor:
        """Mean mapped activation per unit over the batch (per element, or per channel), clamped to [ε, 1 − ε]."""
        if x.ndim < 2:
            raise FluencyError(f"kl-sparsity: expected a batch of activations (B×…), got shape {tuple(x.shape)}")
        y = self.mapped(x)
        if self.unit == "channel":
            mean = y.transpose(0, 1).flatten(1).mean(dim=1)
        else:
            mean = y.flatten(1).mean(dim=0)
        return mean.clamp(self.eps, 1.0 - self.eps)

    def penalty(self, activations: Mapping[str, torch.Tensor], model: FluencyVAE) -> torch.Tensor:
        total: torch.Tensor | None = None
        for x in require_layers(activations, self.layers(model), "kl-sparsity"):
            kl = kl_bernoulli(self.rho, self.rho_hat(x))
            term = kl.sum() if self.reduction == "sum" else kl.mean()
            total = term if total is None else total + term
        assert total is not None
        return total


@hookimpl
def fluency_register_constraints() -> list[ConstraintSpec]:
    return [
        ConstraintSpec(
            name="kl-sparsity",
            factory="fluency.plugins.default_kl_sparsity:KLSparsity",
            description="Sparse-autoencoder KL penalty Σ_j KL(ρ ‖ ρ̂_j) pulling each unit's mean activation "
                        "over the batch towards ρ.",
            options={
                "rho": Option("float", 0.05, "target mean activation ρ, strictly between 0 and 1",
                              minimum=0.0, maximum=1.0),
                **weight_option(),
                "layers": Option("list[str]", None, "layers to constrain (default: the model's metric layers)"),
                "mapping": Option("str", "tanh", "how activations are mapped into (0, 1): tanh (default: the "
                                  "encoder blocks are ReLU outputs, and tanh keeps 0 → 0 so ρ stays a firing "
                                  "rate), sigmoid (signed layers; on ReLU layers ρ̂ ≥ 0.5) or clamp to "
                                  "[eps, 1 − eps] (layers already in [0, 1])", choices=MAPPINGS),
                "eps": Option("float", 1e-6, "ε of the clamp; ρ̂ is always kept in [ε, 1 − ε]",
                              minimum=0.0, maximum=0.5),
                "unit": Option("str", "element", "a unit is one element of an image's activation, or one channel "
                               "(averaged over batch and space)", choices=UNITS),
                "reduction": Option("str", "sum", "combine a layer's units by sum (the standard formula; grows with "
                                    "layer size) or mean (θ comparable across layers)", choices=REDUCTIONS),
            },
        )
    ]
