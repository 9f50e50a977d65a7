"""Constraint ``l1-activation``: the L1 norm of each image's activations, averaged over the batch.

For each chosen layer with N units per image::

    penalty_layer = mean_b Σ_j |x_bj|            (÷ N when ``normalize``)

summed over layers. The L1 norm is the usual convex surrogate of the number of active
units, so it pushes activations towards exact zeros (sparse codes) without a target rate
(compare ``kl-sparsity``).

``normalize`` (default true) divides each layer's norm by its N, making the penalty the
mean |activation| per layer: layers then weigh equally whatever their size (a 32×32×32
layer has 64× the units of a 512-unit one) and θ does not depend on the image size.
With ``normalize=false`` the penalty is the plain L1 norm, dominated by the largest layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fluency import ConstraintSpec, Option, hookimpl
from fluency.core.architecture import FluencyVAE
from fluency.core.constraint import Constraint
from fluency.plugins.default_kl_sparsity import require_layers


def batch_l1(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mean over the batch of each image's L1 norm (÷ units per image when ``normalize``)."""
    flat = x.flatten(1) if x.ndim > 1 else x[:, None]
    norms = flat.abs().sum(dim=1)
    if normalize:
        norms = norms / max(flat.shape[1], 1)
    return norms.mean()


class L1Activation(Constraint):
    """Σ over chosen layers of the batch-mean L1 norm of each image's activations."""

    name = "l1-activation"
    #: default of the ``normalize`` option when it is not given
    normalize_default = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        normalize = self.options.get("normalize")
        self.normalize = self.normalize_default if normalize is None else bool(normalize)

    def penalty(self, activations: Mapping[str, torch.Tensor], model: FluencyVAE) -> torch.Tensor:
        terms = [batch_l1(x, self.normalize) for x in require_layers(activations, self.layers(model), self.name)]
        return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


@hookimpl
def fluency_register_constraints() -> list[ConstraintSpec]:
    return [
        ConstraintSpec(
            name="l1-activation",
            factory="fluency.plugins.default_l1_activation:L1Activation",
            description="L1 norm of each image's activations (batch mean), summed over layers; pushes units to 0.",
            options={
                "weight": Option("float", 1.0, "θ, the factor of the penalty in the loss", minimum=0.0),
                "layers": Option("list[str]", None, "layers to constrain (default: the model's metric layers)"),
                "normalize": Option("bool", True, "divide each layer's L1 norm by its number of units (mean |x|: "
                                    "layers weigh equally, θ independent of image size)"),
            },
        )
    ]
