"""Metric ``gini``: the Gini index of a layer's activations (Hurley & Rickard 2009), higher = sparser.

For one image's activations x (N units), c = |x| sorted ascending, k = 1..N::

    G = 1 − 2 · Σ_k c_k (N − k + ½) / (N · Σ_k c_k)          G(0 vector) = 0

equivalently Σ_i Σ_j |c_i − c_j| / (2 N² mean(c)). G lies in [0, 1 − 1/N]: 0 when all
units are equally active, 1 − 1/N when a single unit is. It is the only common sparsity
measure with all six of Hurley & Rickard's properties (Robin Hood, Scaling, Rising Tide,
Cloning, Bill Gates, Babies).

Negative values (pre-activation, latent or decoder layers) are handled as Hurley &
Rickard define the index, by absolute value (``negative="abs"``, the default).
``negative="shift"`` subtracts the row's minimum when it is negative, as the widely
copied ``gini.py`` (oliviaguest/gini) does — but without that script's ``+1e-7`` on
every element — and exists only to compare with older results: it is not scale
invariant in the usual sense and ranks a layer by its offset, not its sparsity.

NaN or Inf activations are an error (a ``ValueError`` from :func:`gini`, a
:class:`fluency.FluencyError` naming the layer and images from the metric), never a
silent NaN. Sums are accumulated in float64 whatever the input dtype.

Sorting dominates the cost. On a CPU the rows are sorted with numpy (its SIMD sort is
several times faster than ``torch.sort`` on a CPU); on a GPU the batch is sorted on the
device with ``torch.sort``. Rows are processed in chunks of about 1 M values so that
the float64 working copy stays small even for the ``all`` concatenation of big layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.core.errors import FluencyError

#: layer name of the Gini of all chosen layers concatenated
ALL_LAYERS = "all"
NEGATIVE_CHOICES = ("abs", "shift")
#: values (rows × N) sorted at once: keeps the float64 working copy at 8 MiB (and measured a few % faster
#: than one 64×65,536 block)
_CHUNK_VALUES = 1 << 20


class NonFiniteError(ValueError):
    """NaN or Inf values in the input of :func:`gini`; ``rows`` are the offending row indices."""

    def __init__(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)
        super().__init__(f"NaN/Inf activations found (rows {self.rows[:10]}{' ...' if len(self.rows) > 10 else ''})")


def _check_negative(negative: str) -> None:
    if negative not in NEGATIVE_CHOICES:
        raise ValueError(f"negative={negative!r}: use one of {list(NEGATIVE_CHOICES)}")


def _gini_numpy(x: np.ndarray, negative: str = "abs") -> np.ndarray:
    """Gini index of each row of a 2-D numpy array (the CPU path); float64 result of length B."""
    _check_negative(negative)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"gini expects a B×N batch, got shape {x.shape}")
    if x.dtype.kind != "f" or x.dtype.itemsize < 4:
        x = x.astype(np.float64 if x.dtype.kind != "f" else np.float32)
    b, n = x.shape
    out = np.zeros(b, dtype=np.float64)
    if n == 0 or b == 0:
        return out
    weights = n - np.arange(1, n + 1, dtype=np.float64) + 0.5
    step = max(1, _CHUNK_VALUES // n)
    for start in range(0, b, step):
        rows = x[start : start + step]
        if negative == "shift":
            low = rows.min(axis=1, keepdims=True)
            with np.errstate(invalid="ignore"):  # −inf − (−inf): caught below as non-finite
                c = np.where(low < 0, rows - low, rows)
        else:
            c = np.abs(rows)
        # a batched np.sort(axis=1) per chunk measured as fast as a per-row np.sort loop (numpy 2.4, idle
        # machine) and 2-4x faster on a loaded one, where one small BLAS dot per row stalls on its threads
        c.sort(axis=1)
        c64 = c.astype(np.float64, copy=False)
        total = c64.sum(axis=1)
        if not np.isfinite(total).all():
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1)) + start
            if len(bad) == 0:
                raise ValueError("gini: activations too large (their sum overflows float64)")
            raise NonFiniteError(bad.tolist())
        weighted = c64 @ weights
        safe = np.where(total > 0, total, 1.0)
        out[start : start + len(rows)] = np.where(total > 0, 1.0 - 2.0 * weighted / (n * safe), 0.0)
    return np.maximum(out, 0.0)  # all-equal rows can round to −1e−16


def _gini_of_sorted_nonzero(d: np.ndarray, n: int) -> float:
    """G from the ascending non-zero magnitudes ``d`` of an N-vector: zeros take ranks 1..N−m and add
    nothing, so the weights of the m non-zeros are (m − j + ½), j = 1..m."""
    m = d.shape[0]
    total = float(d.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    weighted = float(np.dot(d.astype(np.float64), m - np.arange(1, m + 1, dtype=np.float64) + 0.5))
    return max(0.0, 1.0 - 2.0 * weighted / (n * total))


def gini_sparse_rows(layers: Sequence[np.ndarray], with_all: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Per-layer Gini of |x| for B×N_l float arrays, and optionally of all layers concatenated.

    The CPU fast path for ``negative="abs"``: each row sorts only its non-zero magnitudes (ReLU
    layers are mostly zeros) and the all-layers value merges the already sorted parts (a
    stable sort of k sorted runs) instead of sorting the concatenation again. Exactly equal
    to :func:`gini` (tested).
    """
    b = layers[0].shape[0]
    values = [np.empty(b) for _ in layers]
    merged = np.empty(b) if with_all else None
    n_all = sum(layer.shape[1] for layer in layers)
    for i in range(b):
        parts = []
        for k, layer in enumerate(layers):
            row = np.abs(layer[i])
            if not np.isfinite(row).all():
                raise NonFiniteError([i])
            d = np.sort(row[row != 0])
            values[k][i] = _gini_of_sorted_nonzero(d, layer.shape[1])
            parts.append(d)
        if merged is not None:
            merged[i] = _gini_of_sorted_nonzero(np.sort(np.concatenate(parts), kind="stable"), n_all)
    return values, merged


def _gini_torch(x: torch.Tensor, negative: str = "abs") -> torch.Tensor:
    """Gini index of each row of a 2-D tensor, sorted with ``torch.sort`` on the tensor's device (the GPU path).

    Returns a float64 tensor of length B on the same device.
    """
    _check_negative(negative)
    if x.ndim != 2:
        raise ValueError(f"gini expects a B×N batch, got shape {tuple(x.shape)}")
    x = x.detach()
    if not x.is_floating_point():
        x = x.double()
    b, n = x.shape
    out = torch.zeros(b, dtype=torch.float64, device=x.device)
    if n == 0 or b == 0:
        return out
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(torch.nonzero(bad).flatten().tolist())
    weights = n - torch.arange(1, n + 1, device=x.device, dtype=torch.float64) + 0.5
    step = max(1, _CHUNK_VALUES // n)
    for start in range(0, b, step):
        rows = x[start : start + step]
        if negative == "shift":
            low = rows.min(dim=1, keepdim=True).values
            c = torch.where(low < 0, rows - low, rows)
        else:
            c = rows.abs()
        c = torch.sort(c, dim=1).values.double()
        total, weighted = c.sum(dim=1), c @ weights
        safe = torch.where(total > 0, total, torch.ones_like(total))
        out[start : start + len(rows)] = torch.where(total > 0, 1.0 - 2.0 * weighted / (n * safe),
                                                     torch.zeros_like(total))
    return out.clamp_min(0.0)


def gini(x: np.ndarray | torch.Tensor, negative: str = "abs") -> np.ndarray | torch.Tensor:
    """Hurley & Rickard's Gini index of |x| for each row of a B×N batch (float64, G(0) = 0).

    A numpy array or CPU tensor is sorted with numpy and gives a numpy array; a tensor
    on another device (a GPU) is sorted there with ``torch.sort`` and gives a tensor on
    that device. ``negative`` is ``"abs"`` (Hurley & Rickard) or ``"shift"`` (subtract a
    negative row minimum, as ``gini.py``; only for comparing with older results).
    Raises :class:`NonFiniteError` (a ``ValueError``) if x holds NaN or Inf.
    """
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            return _gini_torch(x, negative)
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return _gini_numpy(x, negative)


class Gini(FluencyMetric):
    """Per-layer Gini index of each image's activations, plus layer ``"all"``.

    Options: ``layers`` (names, or None for the model's defaults), ``all_layers``
    (default True: also report the Gini of all chosen layers concatenated per image,
    under the layer name ``"all"``, when more than one layer is chosen) and ``negative``
    (``"abs"`` or ``"shift"``, see :func:`gini`).

    The ``"all"`` value concatenates the layers' activations as they are, so every unit
    counts once and larger layers weigh more (a 32×32×32 layer outweighs a 512-unit one
    64 to 1); it is not a mean of the per-layer values.
    """

    higher_is_more_fluent: ClassVar[bool | None] = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        _check_negative(self.options.get("negative") or "abs")

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        negative = self.options.get("negative") or "abs"
        all_layers = self.options.get("all_layers")
        names = self.batch_layers(batch)
        flat = {name: self._rows(batch.activations[name]) for name in names}
        with_all = (all_layers is None or bool(all_layers)) and len(names) > 1
        if negative == "abs" and all(isinstance(v, np.ndarray) for v in flat.values()):
            try:
                per_layer, merged = gini_sparse_rows([flat[name] for name in names], with_all)
            except NonFiniteError as exc:
                bad = next(name for name in names if not np.isfinite(flat[name][exc.rows[0]]).all())
                raise FluencyError(f"gini: NaN/Inf activations found in layer {bad!r} for images "
                                   f"{[batch.image_ids[i] for i in exc.rows]}") from None
            out = [MetricValues("gini", v, name) for name, v in zip(names, per_layer)]
            if merged is not None:
                out.append(MetricValues("gini", merged, ALL_LAYERS))
            return out
        out = [MetricValues("gini", self._safe(flat[name], negative, name, batch.image_ids), name) for name in names]
        if (all_layers is None or all_layers) and len(names) > 1:
            parts = [flat[name] for name in names]
            both = torch.cat(parts, dim=1) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts, axis=1)
            out.append(MetricValues("gini", self._safe(both, negative, ALL_LAYERS, batch.image_ids), ALL_LAYERS))
        return out

    @staticmethod
    def _rows(t: torch.Tensor) -> np.ndarray | torch.Tensor:
        """B×… → B×N: a numpy view on the CPU (sorted with numpy), the tensor itself on a GPU."""
        t = t.detach().flatten(1)
        if t.device.type != "cpu":
            return t
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()

    @staticmethod
    def _safe(x: np.ndarray | torch.Tensor, negative: str, layer: str, ids: Sequence[str]) -> Any:
        try:
            return gini(x, negative)
        except NonFiniteError as exc:
            bad = [ids[i] for i in exc.rows if i < len(ids)] or list(ids)
            more = " and more" if len(bad) > 10 else ""
            raise FluencyError(f"gini: NaN/Inf activations found in layer {layer!r} for images {bad[:10]}{more}") \
                from None
        except ValueError as exc:
            raise FluencyError(f"gini: {exc} in layer {layer!r} for images {list(ids)[:10]}") from None


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="gini",
            factory="fluency.plugins.default_gini:Gini",
            description="Gini index of |activations| per layer and over all layers; higher = sparser "
                        "(Hurley & Rickard 2009).",
            needs="activations",
            higher_is_more_fluent=True,
            options={
                "layers": Option("list[str]", None, "layers to measure (default: the model's metric layers)"),
                "all_layers": Option("bool", True, "also report the Gini of all chosen layers concatenated per "
                                     "image (layer 'all'; larger layers weigh more; only with 2+ layers)"),
                "negative": Option("str", "abs", "negative values: abs (|x|, Hurley & Rickard) or shift (subtract "
                                   "a negative minimum, as gini.py; only to compare with older results)",
                                   choices=NEGATIVE_CHOICES),
            },
        )
    ]
