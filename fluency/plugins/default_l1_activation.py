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

from fluency import ConstraintSpec, Option, hookimpl
from fluency.api import L1Penalty, weight_option



class L1Activation(L1Penalty):
    """Σ over chosen layers of the batch-mean L1 norm of each image's activations."""

    name = "l1-activation"
    normalize_default = True


@hookimpl
def fluency_register_constraints() -> list[ConstraintSpec]:
    return [
        ConstraintSpec(
            name="l1-activation",
            factory="fluency.plugins.default_l1_activation:L1Activation",
            description="L1 norm of each image's activations (batch mean), summed over layers; pushes units to 0.",
            options={
                **weight_option(),
                "layers": Option("list[str]", None, "layers to constrain (default: the model's metric layers)"),
                "normalize": Option("bool", True, "divide each layer's L1 norm by its number of units (mean |x|: "
                                    "layers weigh equally, θ independent of image size)"),
            },
        )
    ]
