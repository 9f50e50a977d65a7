"""Metric ``gini``: the Gini index of a layer's activations (Hurley & Rickard 2009), higher = sparser.

For one image's activations x (N units), c = |x| sorted ascending::

    G = 1 − 2 · Σ_k (c_k / ‖c‖₁) · (N − k + ½) / N          G(0) = 0

It is the only common sparsity measure with all six of Hurley & Rickard's properties
(Robin Hood, Scaling, Rising Tide, Cloning, Bill Gates, Babies).

Negative values (pre-activation, latent or decoder layers) are handled as Hurley &
Rickard define it, by absolute value (``negative="abs"``). ``negative="shift"``
subtracts the row minimum instead, as the widely copied ``gini.py`` does, and exists
only to compare with older results (without that script's ``+1e-7``).

Sorting dominates the cost. On a CPU, numpy's sort of one cache-sized vector at a
time beats both a batched ``np.sort(axis=1)`` and ``torch.sort`` (REFERENCE.md
measured ~11× slower); on a GPU the batch is sorted on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.core.errors import FluencyError

ALL_LAYERS = "all"


def _check_finite(x: np.ndarray | torch.Tensor) -> None:
    finite = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    if not bool(finite):
        raise ValueError("NaN/Inf activations found")


def _gini_sorted_rows(c_sorted_sum: np.ndarray, weighted: np.ndarray, n: int) -> np.ndarray:
    """G from Σ c_k and Σ c_k (N − k + ½) per row; rows of zeros give 0."""
    out = np.zeros_like(c_sorted_sum)
    nz = c_sorted_sum > 0
    out[nz] = 1.0 - 2.0 * weighted[nz] / (n * c_sorted_sum[nz])
    return out


def _prepare_numpy(x: np.ndarray, negative: str) -> np.ndarray:
    if negative == "shift":
        low = x.min(axis=1, keepdims=True)
        return np.where(low < 0, x - low, x)
    return np.abs(x)


def gini_numpy(x: np.ndarray, negative: str = "abs") -> np.ndarray:
    """Gini index of each row of a 2-D array (CPU path: one numpy sort per row, float64 sums)."""
    x = np.asarray(x)
    _check_finite(x)
    if x.ndim != 2:
        raise ValueError(f"expected a B×N array, got shape {x.shape}")
    b, n = x.shape
    if n == 0:
        return np.zeros(b)
    weights = (n - np.arange(1, n + 1) + 0.5).astype(np.float64)
    c = _prepare_numpy(x, negative)
    total, weighted = np.empty(b), np.empty(b)
    for i in range(b):
        row = np.sort(c[i])
        total[i] = row.sum(dtype=np.float64)
        weighted[i] = np.dot(row.astype(np.float64, copy=False), weights)
    return _gini_sorted_rows(total, weighted, n)


def gini_torch(x: torch.Tensor, negative: str = "abs") -> torch.Tensor:
    """Gini index of each row of a 2-D tensor, sorted on the tensor's device (the GPU path)."""
    _check_finite(x)
    b, n = x.shape
    if n == 0:
        return torch.zeros(b, dtype=torch.float64, device=x.device)
    if negative == "shift":
        low = x.min(dim=1, keepdim=True).values
        c = torch.where(low < 0, x - low, x)
    else:
        c = x.abs()
    c = torch.sort(c, dim=1).values.double()
    weights = n - torch.arange(1, n + 1, device=x.device, dtype=torch.float64) + 0.5
    total, weighted = c.sum(dim=1), c @ weights
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, 1.0 - 2.0 * weighted / (n * safe), torch.zeros_like(total))


def gini(x: np.ndarray | torch.Tensor, negative: str = "abs") -> np.ndarray | torch.Tensor:
    """Gini index per row of a B×N batch: numpy on the CPU, torch on other devices."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            return gini_torch(x, negative)
        x = x.detach().numpy()
    return gini_numpy(x, negative)


class Gini(FluencyMetric):
    """Per-layer Gini index, plus the Gini of all chosen layers concatenated (``layer="all"``)."""

    higher_is_more_fluent: ClassVar[bool | None] = True

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        negative = self.options.get("negative", "abs")
        layers = self.layers(batch.model) if batch.model is not None else list(batch.activations)
        flat = {name: batch.activations[name].flatten(1) for name in layers}
        out = [MetricValues("gini", self._safe(flat[name], negative, name, batch.image_ids), name) for name in layers]
        if self.options.get("all_layers", True) and len(layers) > 1:
            both = torch.cat([flat[name] for name in layers], dim=1)
            out.append(MetricValues("gini", self._safe(both, negative, ALL_LAYERS, batch.image_ids), ALL_LAYERS))
        return out

    @staticmethod
    def _safe(x: torch.Tensor, negative: str, layer: str, ids: Sequence[str]) -> Any:
        try:
            return gini(x, negative)
        except ValueError as exc:
            raise FluencyError(f"gini: {exc} in layer {layer!r} for images {list(ids)[:10]}") from None


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="gini",
            factory=Gini,
            description="Gini index of the activations per layer and over all layers (Hurley & Rickard 2009).",
            needs="activations",
            higher_is_more_fluent=True,
            options={
                "layers": Option("list[str]", None, "layers to measure (default: the model's encoder blocks)"),
                "all_layers": Option("bool", True, "also report the Gini of all chosen layers concatenated "
                                     "(layer 'all'; larger layers weigh more)"),
                "negative": Option("str", "abs", "negative values: abs (Hurley & Rickard) or shift (subtract the "
                                   "minimum, as gini.py; for comparison with older results only)",
                                   choices=("abs", "shift")),
            },
        )
    ]
