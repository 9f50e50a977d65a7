"""Constraint ``l1-attention``: the L1 norm of the model's CBAM attention weights.

For each attention layer (its output is the B×C weight matrix M of a CBAM channel
attention, Woo et al. 2018)::

    penalty_layer = mean_b Σ_c |M_bc|            (÷ C when ``normalize``)

summed over layers: the report's attention-L1 metric turned into a training penalty, so
that each image is encoded through few channels.

Layers default to all of ``model.attention_layers()``; a model without that method or
without attention layers is an error (add attention, e.g. ``-o vae-small.attention=["enc3"]``).
Explicit ``layers`` must be attention layers when the model lists them.

``normalize`` defaults to false, so the value is the report's L1 norm itself; C is at most
a few hundred, so θ stays in a usable range. With a softmax gate Σ_c M_bc = 1 for every
image: the penalty is then a constant with zero gradient and does nothing — use the
sigmoid gate (or ``kl-sparsity`` with ``mapping="clamp"`` on the attention layer).
"""

from __future__ import annotations

from typing import Any

from fluency import ConstraintSpec, Option, hookimpl
from fluency.api import FluencyError, FluencyVAE, L1Penalty, require_attention_layers, weight_option

def attention_layers_of(model: Any) -> list[str]:
    """``model.attention_layers()``, or a :class:`FluencyError` if the model has none."""
    return require_attention_layers(model, "l1-attention", constraint=True)


class L1Attention(L1Penalty):
    """Σ over attention layers of the batch-mean L1 norm of each image's attention weights."""

    name = "l1-attention"
    normalize_default = False

    def layers(self, model: FluencyVAE) -> list[str]:
        chosen = self.options.get("layers")
        if not chosen:
            return attention_layers_of(model)
        chosen = list(chosen)
        if callable(getattr(model, "attention_layers", None)):
            available = attention_layers_of(model)
            wrong = [n for n in chosen if n not in available]
            if wrong:
                raise FluencyError(f"l1-attention: {wrong} are not attention layers; this model's are {available}")
        return chosen


@hookimpl
def fluency_register_constraints() -> list[ConstraintSpec]:
    return [
        ConstraintSpec(
            name="l1-attention",
            factory="fluency.plugins.default_l1_attention:L1Attention",
            description="L1 norm of the CBAM attention weights (batch mean), summed over attention layers.",
            options={
                **weight_option(),
                "layers": Option("list[str]", None, "attention layers to constrain (default: all of the model's)"),
                "normalize": Option("bool", False, "divide each layer's L1 norm by its number of channels "
                                    "(default: the plain L1 norm, as the report's attention metric)"),
            },
        )
    ]
