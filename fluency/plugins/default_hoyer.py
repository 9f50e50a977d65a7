"""Metric ``hoyer``: Hoyer's sparsity of a layer's activations (Hoyer 2004), higher = sparser.

    H(x) = (√N − ‖x‖₁ / ‖x‖₂) / (√N − 1)

1 for a one-hot vector, 0 for a constant one; H(0) = 0 by convention. Unlike the Gini
index it fails Hurley & Rickard's Cloning property (H(x‖x) ≠ H(x)), so values are
only comparable between layers of the same size. Negative values enter by |x|.
"""

from __future__ import annotations

from typing import Any

import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl, units_as_rows
from fluency.api import (ALL_LAYERS, FluencyError, all_layers_options, channel_rows, layer_weights, per_option,
                         wants_all_layers, weighted_mean)


def hoyer_from_norms(l1: torch.Tensor, l2: torch.Tensor, n: int) -> torch.Tensor:
    """Hoyer sparsity from the L1 and L2 norms of N-vectors (float64; 0 for a zero vector or N < 2)."""
    l1, l2 = l1.double(), l2.double()
    if n < 2:
        return torch.zeros_like(l1)
    ratio = torch.where(l2 > 0, l1 / torch.where(l2 > 0, l2, torch.ones_like(l2)), torch.full_like(l1, n ** 0.5))
    return (n ** 0.5 - ratio) / (n ** 0.5 - 1)


def hoyer(x: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity per row of a B×N tensor (float64)."""
    x = x.double()
    return hoyer_from_norms(x.abs().sum(1), x.norm(dim=1), x.shape[1])


class Hoyer(FluencyMetric):
    """Per-layer Hoyer sparsity; ``per="channel"`` averages the per-channel values of each image.

    With ``all_layers=True`` it also reports layer ``"all"``: with ``layer_weighting="units"``
    the Hoyer sparsity of the concatenated layers (from the summed L1 and squared L2 norms),
    else a (weighted) mean of the per-layer values (:mod:`fluency.core.plugin.layer_options`).
    """


    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        names = self.batch_layers(batch)
        with_all = wants_all_layers(self.options, names, default=False)
        weights = layer_weights("hoyer", self.options, names) if with_all else None
        per_channel = self.options.get("per", "image") == "channel"
        out, norms = [], []
        for name in names:
            a = batch.activations[name].detach()
            if not bool(torch.isfinite(a).all()):
                raise FluencyError(f"hoyer: NaN/Inf activations in layer {name!r} for images {list(batch.image_ids)[:10]}")
            if per_channel:
                rows, c = channel_rows(a)
                values = hoyer(rows).view(a.shape[0], c)
                norms.append(values)
                values = values.mean(1)
            else:
                flat = units_as_rows(a).double()
                norms.append((flat.abs().sum(1), flat.pow(2).sum(1), flat.shape[1]))
                values = hoyer_from_norms(norms[-1][0], norms[-1][1].sqrt(), flat.shape[1])
            out.append(MetricValues("hoyer", values, name))
        if with_all:
            if weights is not None:
                pooled: Any = weighted_mean([v.values for v in out], weights)
            elif per_channel:  # every channel of every layer counts once
                pooled = torch.cat(norms, dim=1).mean(1)
            else:
                pooled = hoyer_from_norms(sum(n[0] for n in norms), sum(n[1] for n in norms).sqrt(),
                                          sum(n[2] for n in norms))
            out.append(MetricValues("hoyer", pooled, ALL_LAYERS))
        return out


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [MetricSpec(
        name="hoyer", factory=Hoyer, needs="activations", higher_is_more_fluent=True,
        description="Hoyer sparsity (√N − L1/L2)/(√N − 1) of the activations per layer (Hoyer 2004).",
        options={"layers": Option("list[str]", None, "layers to measure (default: the model's encoder blocks)"),
                 **per_option("Hoyer sparsity"), **all_layers_options(default=False)})]
