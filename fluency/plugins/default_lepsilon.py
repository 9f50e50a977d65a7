"""Metric ``lepsilon``: how many units of a layer are active, |x| > ε (higher = denser = less fluent).

Reports the count (``lepsilon``) and the count divided by the layer size
(``lepsilon-fraction``). This is the complement of Hurley & Rickard's ℓ⁰_ε (which
counts |x| ≤ ε). The count is not scale invariant, so ``mode="relative"`` takes the
threshold as ε × the largest |x| of that image in that layer.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.core.errors import FluencyError


def active_count(x: torch.Tensor, epsilon: float, mode: str = "absolute") -> torch.Tensor:
    """Per row of a B×N tensor, the number of entries with |x| > threshold."""
    a = x.abs()
    if mode == "relative":
        threshold = epsilon * a.max(dim=1, keepdim=True).values
    elif mode == "absolute":
        threshold = torch.full((x.shape[0], 1), float(epsilon), dtype=a.dtype, device=a.device)
    else:
        raise ValueError(f"lepsilon mode {mode!r}: use absolute or relative")
    return (a > threshold).sum(dim=1)


class LEpsilon(FluencyMetric):
    """Count and fraction of units with |x| > ε per layer."""

    higher_is_more_fluent: ClassVar[bool | None] = False

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        eps, mode = float(self.options["epsilon"]), str(self.options.get("mode", "absolute"))
        layers = self.layers(batch.model) if batch.model is not None else list(batch.activations)
        out: list[MetricValues] = []
        for name in layers:
            x = batch.activations[name].flatten(1)
            if not bool(torch.isfinite(x).all()):
                raise FluencyError(f"lepsilon: NaN/Inf activations in layer {name!r} for images "
                                   f"{list(batch.image_ids)[:10]}")
            count = active_count(x, eps, mode).double()
            out.append(MetricValues("lepsilon", count, name))
            out.append(MetricValues("lepsilon-fraction", count / x.shape[1], name))
        return out


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="lepsilon",
            factory=LEpsilon,
            description="Count and fraction of units with |x| > epsilon per layer (L-epsilon; higher = denser).",
            needs="activations",
            higher_is_more_fluent=False,
            options={
                "epsilon": Option("float", 0.01, "threshold ε (absolute, or a fraction of the max in relative mode)",
                                  minimum=0.0),
                "mode": Option("str", "absolute", "absolute: |x| > ε; relative: |x| > ε · max|x| of the image's layer",
                               choices=("absolute", "relative")),
                "layers": Option("list[str]", None, "layers to measure (default: the model's encoder blocks)"),
            },
        )
    ]
