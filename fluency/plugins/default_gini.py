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

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl, units_as_rows
from fluency.api import (ALL_LAYERS, FluencyError, all_layers_options, channel_rows, layer_weights, per_option,
                         wants_all_layers, weighted_mean)

NEGATIVE_CHOICES = ("abs", "shift")
#: values (rows × N) sorted at once on a GPU: bounds the float64 working copy at 8 MiB
_CHUNK_VALUES = 1 << 20


class NonFiniteError(ValueError):
    """NaN or Inf values in the input of :func:`gini`; ``rows`` are the offending row indices."""

    def __init__(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)
        super().__init__(f"NaN/Inf activations found (rows {self.rows[:10]}{' ...' if len(self.rows) > 10 else ''})")


def _check_negative(negative: str) -> None:
    if negative not in NEGATIVE_CHOICES:
        raise ValueError(f"negative={negative!r}: use one of {list(NEGATIVE_CHOICES)}")


#: (k − ½) for k = L … 1: its last m entries are the weights (m − j + ½), j = 1 … m, of m ascending values
_WEIGHTS = np.arange(1 << 16, 0, -1, dtype=np.float64) - 0.5


def _descending_weights(m: int) -> np.ndarray:
    """The weights (m − j + ½), j = 1 … m, as a view of one cached array (grown when a row is longer)."""
    global _WEIGHTS
    if m > len(_WEIGHTS):
        _WEIGHTS = np.arange(max(m, 2 * len(_WEIGHTS)), 0, -1, dtype=np.float64) - 0.5
    return _WEIGHTS[len(_WEIGHTS) - m:]


def _sorted_nonzero(c: np.ndarray) -> np.ndarray:
    """Sort a non-negative row in place and return the view of its non-zero tail; NaN/Inf (sorted last by
    numpy) raise :class:`NonFiniteError`. Sorting the whole row and slicing beats masking the zeros out first:
    numpy's SIMD sort is fast on runs of zeros, a boolean mask is not."""
    c.sort()
    if c.shape[0] and not np.isfinite(c[-1]):
        raise NonFiniteError([0])
    return c[int(np.searchsorted(c, c.dtype.type(0), side="right")):]  # a Python 0 would cast the row


def _gini_of_sorted_nonzero(d: np.ndarray, n: int) -> float:
    """G from the ascending non-zero magnitudes ``d`` of an N-vector: zeros take ranks 1..N−m and add
    nothing, so the weights of the m non-zeros are (m − j + ½), j = 1..m (sums in float64)."""
    total = float(d.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    if not np.isfinite(total):
        raise ValueError("gini: activations too large (their sum overflows float64)")
    # einsum, not np.dot: a mixed float32·float64 dot takes a slow generic loop, and a BLAS dot per row
    # stalls on its threads when the machine is busy (both measured ~20-50x slower per row here)
    weighted = float(np.einsum("i,i->", d, _descending_weights(d.shape[0]), dtype=np.float64))
    return max(0.0, 1.0 - 2.0 * weighted / (n * total))  # all-equal rows can round to −1e−16


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"gini expects a B×N batch, got shape {x.shape}")
    if x.dtype.kind != "f" or x.dtype.itemsize < 4:
        x = x.astype(np.float64 if x.dtype.kind != "f" else np.float32)
    return x


def _threads(threads: int | None, rows: int) -> int:
    """Worker threads for ``rows`` rows: ``threads``, else torch's intra-op setting (OMP_NUM_THREADS)."""
    return max(1, min(rows, int(threads) if threads else torch.get_num_threads()))


def _over_rows(work: Callable[[int, int], None], rows: int, threads: int | None) -> None:
    """Run ``work(start, stop)`` on contiguous blocks of rows, in threads when more than one is allowed:
    numpy releases the GIL while it sorts, and every row writes only its own output slot."""
    n = _threads(threads, rows)
    if n == 1:
        work(0, rows)
        return
    bounds = np.linspace(0, rows, n + 1).astype(int)
    with ThreadPoolExecutor(n) as pool:
        for future in [pool.submit(work, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
            future.result()


def _gini_numpy(x: np.ndarray, negative: str = "abs", threads: int | None = None) -> np.ndarray:
    """Gini index of each row of a 2-D numpy array (the CPU path); float64 result of length B.

    One row at a time (rows split over ``threads``): a per-row ``np.sort`` of float32
    measured faster than a batched ``sort(axis=1)`` and keeps the working copy to one row.
    """
    _check_negative(negative)
    x = _as_float(x)
    b, n = x.shape
    out = np.zeros(b, dtype=np.float64)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            row = x[i]
            if negative == "shift":
                low = row.min()
                with np.errstate(invalid="ignore"):  # −inf − (−inf): caught below as non-finite
                    c = row - low if low < 0 else row.copy()
                if not np.isfinite(low):
                    raise NonFiniteError([i])
            else:
                c = np.abs(row)
            out[i] = _gini_of_sorted_nonzero(_sorted_nonzero(c), n)

    if n:
        try:
            _over_rows(work, b, threads)
        except NonFiniteError:
            raise NonFiniteError(np.flatnonzero(~np.isfinite(x).all(axis=1)).tolist()) from None
    return out


def gini_sparse_rows(layers: Sequence[np.ndarray], with_all: bool,
                     threads: int | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Per-layer Gini of |x| for B×N_l float arrays, and optionally of all layers concatenated.

    The CPU fast path for ``negative="abs"``: each row of each layer is sorted once; the
    all-layers value sorts only the concatenated *non-zero* tails (ReLU layers are mostly
    zeros, which take the lowest ranks and add nothing). Rows are split over ``threads``
    (default: ``torch.get_num_threads()``). Exactly equal to :func:`gini` of each layer
    and of the concatenation (tested).
    """
    layers = [_as_float(layer) for layer in layers]
    b = layers[0].shape[0]
    values = [np.zeros(b) for _ in layers]
    merged = np.zeros(b) if with_all else None
    n_all = sum(layer.shape[1] for layer in layers)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            tails = []
            for k, layer in enumerate(layers):
                try:
                    tail = _sorted_nonzero(np.abs(layer[i]))
                except NonFiniteError:
                    raise NonFiniteError([i]) from None
                values[k][i] = _gini_of_sorted_nonzero(tail, layer.shape[1])
                tails.append(tail)
            if merged is not None:
                both = np.concatenate(tails)
                both.sort()
                merged[i] = _gini_of_sorted_nonzero(both, n_all)

    _over_rows(work, b, threads)
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


def gini(x: np.ndarray | torch.Tensor, negative: str = "abs", threads: int | None = None) -> np.ndarray | torch.Tensor:
    """Hurley & Rickard's Gini index of |x| for each row of a B×N batch (float64, G(0) = 0).

    A numpy array or CPU tensor is sorted with numpy and gives a numpy array; a tensor
    on another device (a GPU) is sorted there with ``torch.sort`` and gives a tensor on
    that device. ``negative`` is ``"abs"`` (Hurley & Rickard) or ``"shift"`` (subtract a
    negative row minimum, as ``gini.py``; only for comparing with older results).
    On the CPU the rows are split over ``threads`` (default ``torch.get_num_threads()``);
    the result does not depend on it. Raises :class:`NonFiniteError` (a ``ValueError``)
    if x holds NaN or Inf.
    """
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            return _gini_torch(x, negative)
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return _gini_numpy(x, negative, threads)


class Gini(FluencyMetric):
    """Per-layer Gini index of each image's activations, plus layer ``"all"``.

    Options: ``layers`` (names, or None for the model's defaults), ``negative``
    (``"abs"`` or ``"shift"``, see :func:`gini`), ``per`` (``"image"``: the whole layer;
    ``"channel"``: the mean over channels of each feature map's Gini), and the "all
    layers" value (:mod:`fluency.core.plugin.layer_options`): ``all_layers`` (default True),
    ``layer_weighting`` (``"units"``: the Gini of the concatenated layers, every unit
    counting once, so larger layers weigh more; ``"equal"``: the mean of the per-layer
    values) or ``layer_weights`` (a weighted mean of the per-layer values).
    """


    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        _check_negative(self.options.get("negative") or "abs")

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        negative = self.options.get("negative") or "abs"
        names = self.batch_layers(batch)
        with_all = wants_all_layers(self.options, names, default=True)
        weights = layer_weights("gini", self.options, names) if with_all else None
        ids = list(batch.image_ids)
        if (self.options.get("per") or "image") == "channel":
            per_channel = [self._per_channel(batch.activations[name], negative, name, ids) for name in names]
            out = [MetricValues("gini", v.mean(axis=1), name) for name, v in zip(names, per_channel)]
            if with_all:  # pooled: every channel of every layer counts once
                pooled = np.concatenate(per_channel, axis=1).mean(axis=1) if weights is None else \
                    weighted_mean([v.mean(axis=1) for v in per_channel], weights)
                out.append(MetricValues("gini", pooled, ALL_LAYERS))
            return out
        flat = {name: self._rows(batch.activations[name]) for name in names}
        pooled_all = with_all and weights is None
        if negative == "abs" and all(isinstance(v, np.ndarray) for v in flat.values()):
            per_layer, merged = self._sparse([flat[name] for name in names], pooled_all, names, ids)
        else:
            per_layer = [self._safe(flat[name], negative, name, ids) for name in names]
            merged = None
            if pooled_all:
                parts = [flat[name] for name in names]
                both = torch.cat(parts, dim=1) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts, axis=1)
                merged = self._safe(both, negative, ALL_LAYERS, ids)
        out = [MetricValues("gini", v, name) for name, v in zip(names, per_layer)]
        if with_all:
            out.append(MetricValues("gini", merged if weights is None else weighted_mean(per_layer, weights),
                                    ALL_LAYERS))
        return out

    def _per_channel(self, activations: torch.Tensor, negative: str, layer: str, ids: Sequence[str]) -> np.ndarray:
        """B×C Gini of each channel's feature map."""
        rows, channels = channel_rows(activations.detach())
        flat = self._rows(rows)
        image_ids = [ids[i // channels] for i in range(len(ids) * channels)]
        if negative == "abs" and isinstance(flat, np.ndarray):
            (values,), _ = self._sparse([flat], False, [layer], image_ids)
        else:
            values = self._safe(flat, negative, layer, image_ids)
        if isinstance(values, torch.Tensor):
            values = values.cpu().numpy()
        return np.asarray(values, dtype=np.float64).reshape(len(ids), channels)

    @staticmethod
    def _sparse(layers: list[np.ndarray], with_all: bool, names: Sequence[str],
                ids: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray | None]:
        try:
            return gini_sparse_rows(layers, with_all)
        except NonFiniteError as exc:
            bad = next(name for name, layer in zip(names, layers) if not np.isfinite(layer[exc.rows[0]]).all())
            images = list(dict.fromkeys(ids[i] for i in exc.rows))
            raise FluencyError(f"gini: NaN/Inf activations found in layer {bad!r} for images {images[:10]}") from None

    @staticmethod
    def _rows(t: torch.Tensor) -> np.ndarray | torch.Tensor:
        """B×… → B×N (units in memory order: the Gini does not depend on it): a numpy view on the CPU (sorted
        with numpy), the tensor itself on a GPU."""
        t = units_as_rows(t)
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
            bad = list(dict.fromkeys(ids[i] for i in exc.rows if i < len(ids))) or list(ids)
            more = " and more" if len(bad) > 10 else ""
            raise FluencyError(f"gini: NaN/Inf activations found in layer {layer!r} for images {bad[:10]}{more}") \
                from None
        except ValueError as exc:
            raise FluencyError(f"gini: {exc} in layer {layer!r} for images {list(dict.fromkeys(ids))[:10]}") from None


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
                **all_layers_options(default=True),
                **per_option("Gini"),
                "negative": Option("str", "abs", "negative values: abs (|x|, Hurley & Rickard) or shift (subtract "
                                   "a negative minimum, as gini.py; only to compare with older results)",
                                   choices=NEGATIVE_CHOICES),
            },
        )
    ]
