"""Metric ``hoyer``: Hoyer's sparsity of a layer's activations (Hoyer 2004), higher = sparser.

    H(x) = (√N − ‖x‖₁ / ‖x‖₂) / (√N − 1)

1 for a one-hot vector, 0 for a constant one; H(0) = 0 by convention. Unlike the Gini
index it fails Hurley & Rickard's Cloning property (H(x‖x) ≠ H(x)), so values are
only comparable between layers of the same size. Negative values enter by |x|.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.core.errors import FluencyError


def hoyer(x: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity per row of a B×N tensor (float64)."""
    x = x.double()
    n = x.shape[1]
    if n < 2:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    l1, l2 = x.abs().sum(1), x.norm(dim=1)
    ratio = torch.where(l2 > 0, l1 / torch.where(l2 > 0, l2, torch.ones_like(l2)), torch.full_like(l1, n ** 0.5))
    return (n ** 0.5 - ratio) / (n ** 0.5 - 1)


class Hoyer(FluencyMetric):
    """Per-layer Hoyer sparsity; ``per="channel"`` averages the per-channel values of each image."""

    higher_is_more_fluent: ClassVar[bool | None] = True

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        out = []
        for name in self.batch_layers(batch):
            a = batch.activations[name]
            if not bool(torch.isfinite(a).all()):
                raise FluencyError(f"hoyer: NaN/Inf activations in layer {name!r} for images {list(batch.image_ids)[:10]}")
            if self.options.get("per", "image") == "channel" and a.dim() > 2:
                b, c = a.shape[:2]
                values = hoyer(a.reshape(b * c, -1)).view(b, c).mean(1)
            else:
                values = hoyer(a.flatten(1))
            out.append(MetricValues("hoyer", values, name))
        return out


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [MetricSpec(
        name="hoyer", factory=Hoyer, needs="activations", higher_is_more_fluent=True,
        description="Hoyer sparsity (√N − L1/L2)/(√N − 1) of the activations per layer (Hoyer 2004).",
        options={"layers": Option("list[str]", None, "layers to measure (default: the model's encoder blocks)"),
                 "per": Option("str", "image", "image: over the whole layer; channel: mean of per-channel values",
                               choices=("image", "channel"))})]
