"""Metric ``lepsilon``: how many units of a layer are active, |x| > ε (higher = denser = less fluent).

Per layer and image it reports the count of units with |x| > ε (metric ``lepsilon``,
as the report used it) and that count divided by the layer's size N (metric
``lepsilon-fraction``, comparable across layers). Negative activations count by
their magnitude. This is the complement of Hurley & Rickard's ℓ⁰_ε, which counts
|x| ≤ ε; like it, the count fails all six of their sparsity properties.

The count is not scale invariant: with ``mode="absolute"`` the threshold is ε itself;
with ``mode="relative"`` it is ε × the largest |x| of that image in that layer (an
all-zero layer then counts 0). A value exactly at the threshold is not counted.
NaN or Inf activations are an error naming the layer and images, never a silent count.

With ``all_layers=True`` layer ``"all"`` gives the count and fraction over all chosen
layers: pooled (``layer_weighting="units"``: total count, and total count / total units)
or a (weighted) mean of the per-layer values (:mod:`fluency.core.plugin.layer_options`). There is
no ``per="channel"`` variant: the mean over channels of per-channel fractions is the
layer's fraction itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl, units_as_rows
from fluency.api import ALL_LAYERS, FluencyError, all_layers_options, layer_weights, wants_all_layers, weighted_mean

MODES = ("absolute", "relative")


def active_count(x: torch.Tensor | np.ndarray, epsilon: float, mode: str = "absolute") -> torch.Tensor:
    """Per row of a B×N batch, the number of entries with |x| > threshold (an int64 tensor on x's device).

    ``mode="absolute"``: threshold = ε; ``"relative"``: threshold = ε · max|x| of the row.
    Raises ``ValueError`` for NaN/Inf input, a negative ε or an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"lepsilon mode {mode!r}: use one of {list(MODES)}")
    if not epsilon >= 0:
        raise ValueError(f"lepsilon epsilon must be >= 0, got {epsilon!r}")
    x = torch.as_tensor(x).detach()
    if x.ndim != 2:
        raise ValueError(f"lepsilon expects a B×N batch, got shape {tuple(x.shape)}")
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(_count_numpy(x.numpy(), epsilon, mode))
    return _count_torch(x, epsilon, mode)


def _count_torch(x: torch.Tensor, epsilon: float, mode: str) -> torch.Tensor:
    """The device (GPU) path of :func:`active_count`, on the tensor's own device."""
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"NaN/Inf activations found (rows {torch.nonzero(bad).flatten().tolist()[:10]})")
    a = x.abs()
    if mode == "relative":
        if a.shape[1] == 0:
            return torch.zeros(a.shape[0], dtype=torch.int64, device=a.device)
        threshold = epsilon * a.amax(dim=1, keepdim=True)
        return (a > threshold).sum(dim=1)
    return (a > epsilon).sum(dim=1)


def _count_numpy(a: np.ndarray, epsilon: float, mode: str) -> np.ndarray:
    """The CPU path of :func:`active_count`, measured ~10x faster than the torch ops here: NaN/Inf found
    from the array's min and max (both NaN-propagating), one comparison per sign (none for x < −t when
    no value is that negative, as in ReLU layers) and a per-row ``count_nonzero`` (SIMD; with ``axis=1``
    it is ~3x slower)."""
    b, n = a.shape
    if n == 0 or b == 0:
        return np.zeros(b, dtype=np.int64)
    low, high = a.min(), a.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        raise ValueError(f"NaN/Inf activations found (rows {bad.tolist()[:10]})")
    eps = a.dtype.type(epsilon)
    if mode == "relative":
        threshold: Any = (np.maximum(a.max(axis=1), -a.min(axis=1)) * eps)[:, None]
        above, below = a > threshold, a < -threshold
    else:
        above = a > eps
        below = a < -eps if low < -eps else None
    counts = np.fromiter((np.count_nonzero(row) for row in above), dtype=np.int64, count=b)
    if below is not None:
        counts += np.fromiter((np.count_nonzero(row) for row in below), dtype=np.int64, count=b)
    return counts


class LEpsilon(FluencyMetric):
    """Count (``lepsilon``) and fraction (``lepsilon-fraction``) of units with |x| > ε, per layer.

    Options: ``epsilon`` (≥ 0, default 0.01), ``mode`` (``"absolute"`` or
    ``"relative"``: ε times the image's largest |x| in the layer), ``layers``.
    More active units means a less sparse code, so ``higher_is_more_fluent`` is False.
    """


    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.epsilon = float(0.01 if self.options.get("epsilon") is None else self.options["epsilon"])
        self.mode = str(self.options.get("mode") or "absolute")
        if self.mode not in MODES or not self.epsilon >= 0:
            raise FluencyError(f"lepsilon: epsilon must be >= 0 and mode one of {list(MODES)} "
                               f"(got epsilon={self.epsilon!r}, mode={self.mode!r})")

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        out: list[MetricValues] = []
        names = self.batch_layers(batch)
        with_all = wants_all_layers(self.options, names, default=False)
        weights = layer_weights("lepsilon", self.options, names) if with_all else None
        counts, fractions, total_units = [], [], 0
        for name in names:
            x = units_as_rows(batch.activations[name])  # counts do not depend on the order of units
            try:
                count = active_count(x, self.epsilon, self.mode).double()
            except ValueError as exc:
                raise FluencyError(f"lepsilon: {exc} in layer {name!r} for images {self._bad(x, batch.image_ids)}") \
                    from None
            fraction = count / max(x.shape[1], 1)
            out.append(MetricValues("lepsilon", count, name))
            out.append(MetricValues("lepsilon-fraction", fraction, name))
            counts.append(count)
            fractions.append(fraction)
            total_units += x.shape[1]
        if with_all:
            if weights is None:
                total = torch.stack(counts).sum(0)
                all_count: Any = total
                all_fraction: Any = total / max(total_units, 1)
            else:
                all_count, all_fraction = weighted_mean(counts, weights), weighted_mean(fractions, weights)
            out.append(MetricValues("lepsilon", all_count, ALL_LAYERS))
            out.append(MetricValues("lepsilon-fraction", all_fraction, ALL_LAYERS))
        return out

    @staticmethod
    def _bad(x: torch.Tensor, ids: Sequence[str]) -> list[str]:
        rows = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten().tolist()
        return [ids[i] for i in rows if i < len(ids)][:10] or list(ids)[:10]


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="lepsilon",
            factory="fluency.plugins.default_lepsilon:LEpsilon",
            description="Count and fraction of units with |x| > epsilon per layer (L-epsilon; higher = denser).",
            needs="activations",
            higher_is_more_fluent=False,
            options={
                "epsilon": Option("float", 0.01, "threshold ε (absolute, or a fraction of the layer's max |x| "
                                  "in relative mode)", minimum=0.0),
                "mode": Option("str", "absolute", "absolute: |x| > ε; relative: |x| > ε · max|x| of the image's "
                               "layer", choices=MODES),
                "layers": Option("list[str]", None, "layers to measure (default: the model's metric layers)"),
                **all_layers_options(default=False),
            },
        )
    ]
