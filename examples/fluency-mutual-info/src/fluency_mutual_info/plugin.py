"""The plugins: metrics ``activation-entropy`` and ``mutual-info``, analysis ``layer-mi``.

Mutual information is a property of a *set* of images, not of one image. The two metrics are the
two honest per-image readings of it (see the package README):

- ``activation-entropy``: a property of one image alone, the Shannon entropy of the histogram of
  its activations in a layer (how spread out the code is), not an MI;
- ``mutual-info``: the local MI i(x_j; y_j) between an image's pixels and its layer response,
  defined relative to the stimulus set; its mean over the set is the MI estimate, reported with a
  bootstrap interval by the analysis ``layer-mi``.

Registration is cheap: scikit-learn is imported only when a metric finishes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from fluency import (Analysis, AnalysisData, AnalysisSpec, FluencyMetric, MetricBatch, MetricSpec, MetricValues,
                     Option, hookimpl, units_as_rows)
from fluency.api import RESULT_COLUMNS, EffectSize, FluencyError

FLUENCY_PLUGIN_API = "1.1"

#: activations histogrammed at once (whole images), bounding the float64 and index copies to ~128 MiB each
CHUNK = 1 << 24
#: input features projected at once (a fixed split, so the float64 sums do not depend on the batch size)
FEATURE_CHUNK = 1 << 14
LAYERS_OPTION = Option("list[str]", None, "layers to measure (default: the model's default metric layers)")


def histogram_entropy(rows: torch.Tensor, bins: int, miller_madow: bool = False) -> torch.Tensor:
    """Shannon entropy in bits of the histogram of each row of a B×N tensor (float64, on its device).

    Equal-width bins over [min, max] of the row: unit a goes to bin min(⌊(a − min)·bins/(max − min)⌋,
    bins − 1), so the value does not change when the row is scaled or shifted; a constant row has
    entropy 0. ``miller_madow`` adds (m − 1)/(2N ln 2), m the number of non-empty bins.
    """
    n = rows.shape[1]
    out = []
    for part in rows.split(max(1, CHUNK // max(n, 1))):
        x = part.double()
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        width = hi - lo
        scale = torch.where(width > 0, bins / torch.where(width > 0, width, torch.ones_like(width)),
                            torch.zeros_like(width))
        idx = ((x - lo) * scale).long().clamp_(0, bins - 1)
        idx += torch.arange(len(x), device=x.device).unsqueeze(1) * bins
        counts = torch.bincount(idx.flatten(), minlength=len(x) * bins).view(len(x), bins).double()
        p = counts / n
        h = -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(1)
        if miller_madow:
            h = h + ((counts > 0).sum(1) - 1).double() / (2 * n * math.log(2))
        out.append(h)
    return torch.cat(out)


class ActivationEntropy(FluencyMetric):
    """Per image and layer: entropy (bits) of the histogram of that image's activations in that layer."""

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        bins = int(self.options.get("bins", 64))
        miller_madow = self.options.get("correction", "none") == "miller-madow"
        out = []
        for name in self.batch_layers(batch):
            a = batch.activations[name].detach()
            if not bool(torch.isfinite(a).all()):
                raise FluencyError(f"activation-entropy: NaN/Inf activations in layer {name!r} for images "
                                   f"{list(batch.image_ids)[:10]}")
            out.append(MetricValues("activation-entropy", histogram_entropy(units_as_rows(a), bins, miller_madow),
                                    name))
        return out


class PointwiseMI(FluencyMetric):
    """Local MI (bits) between an image's pixels and its response in each layer, relative to the stimulus set.

    Each batch's pixels and layer responses are projected to ``project`` dimensions by fixed
    Gaussian matrices drawn from the run seed and the layer name (so values do not depend on batch
    size or order); only these N × ``project`` rows are kept. :meth:`finish` reduces each side to
    ``dims`` unit-variance principal components and returns the local MI of every image.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._ids: list[str] = []
        self._pixels: list[np.ndarray] = []
        self._rows: dict[str, list[np.ndarray]] = {}
        self._matrices: dict[tuple[str, int], torch.Tensor] = {}
        self._seed: int | None = None

    def _project(self, key: str, t: torch.Tensor) -> np.ndarray:
        """B × ``project`` float64 rows: ``t`` in its logical (C, H, W) order times this key's fixed matrix."""
        from fluency_mutual_info.estimators import projection_matrix, seed_key

        flat = t.detach().reshape(t.shape[0], -1)  # logical order, whatever the memory format
        dims, n_features = int(self.options.get("project", 64)), flat.shape[1]
        matrix = self._matrices.get((key, n_features))
        if matrix is None:
            matrix = torch.from_numpy(projection_matrix(n_features, dims, seed_key(self._seed or 0, key)))
            matrix = self._matrices[(key, n_features)] = matrix.to(flat.device)
        out = torch.zeros(flat.shape[0], dims, dtype=torch.float64, device=flat.device)
        for start in range(0, n_features, FEATURE_CHUNK):  # fixed float64 chunks: same sums for any batch size
            out += flat[:, start:start + FEATURE_CHUNK].double() @ matrix[start:start + FEATURE_CHUNK].double()
        return out.cpu().numpy()

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        if batch.images is None:
            raise FluencyError("mutual-info needs the images: with `fluency measure`, pass --images")
        if self._seed is None:
            self._seed = int(batch.seed)
        self._ids.extend(map(str, batch.image_ids))
        self._pixels.append(self._project("image", batch.images))
        for name in self.batch_layers(batch):
            a = batch.activations[name]
            if not bool(torch.isfinite(a).all()):
                raise FluencyError(f"mutual-info: NaN/Inf activations in layer {name!r} for images "
                                   f"{list(batch.image_ids)[:10]}")
            self._rows.setdefault(name, []).append(self._project(f"layer:{name}", a))
        return []

    def finish(self) -> list[tuple[Sequence[str], MetricValues]]:
        from fluency_mutual_info.estimators import gaussian_local_mi, ksg_local_mi, reduce

        if not self._ids:
            return []
        n, dims, k = len(self._ids), int(self.options.get("dims", 8)), int(self.options.get("k", 3))
        estimator = self.options.get("estimator", "gaussian")
        need = max(2 * dims + 2, k + 1 if estimator == "ksg" else 0)
        if n < need:
            raise FluencyError(f"mutual-info: {n} images are too few for dims={dims} (need at least {need}, as "
                               f"the joint image-layer space has {2 * dims} dimensions); lower "
                               "-o mutual-info.dims or measure more images")
        rng = np.random.default_rng(self._seed or 0)
        x = reduce(np.concatenate(self._pixels), dims)
        out: list[tuple[Sequence[str], MetricValues]] = []
        for layer, parts in self._rows.items():
            y = reduce(np.concatenate(parts), dims)
            if estimator == "ksg":  # break exact ties (duplicate images) far below the unit scale
                jitter = 1e-10 * rng.standard_normal((n, x.shape[1] + y.shape[1]))
                values = ksg_local_mi(x + jitter[:, :x.shape[1]], y + jitter[:, x.shape[1]:], k)
            else:
                try:
                    values = gaussian_local_mi(x, y)
                except ValueError as exc:
                    raise FluencyError(f"mutual-info: layer {layer!r}: {exc}; the Gaussian MI is infinite, "
                                       "try fewer dims or estimator=ksg") from None
            out.append((list(self._ids), MetricValues("mutual-info", values, layer)))
        return out


class LayerMI(Analysis):
    """Set-level MI between the images and each layer: the mean of ``mutual-info`` per (checkpoint, layer).

    One row per (checkpoint, layer): ``estimate`` the mean local MI in bits over the analysed images
    (``statistic = "mi_bits"``), ``p`` NaN (descriptive), ``n``, and a percentile bootstrap interval
    over images (``ci_low``, ``ci_high``) that holds the density fit fixed. Requires the run to
    measure ``--metric mutual-info``; without its rows the result is empty. Reads no ratings.
    """

    def run(self, data: AnalysisData) -> pd.DataFrame:
        from fluency_mutual_info.estimators import bootstrap_mean_ci

        metrics = data.metrics[data.metrics["metric"] == "mutual-info"]
        n_boot, level, seed = int(self.options.get("n_boot", 2000)), float(self.options.get("ci", 0.95)), \
            int(self.options.get("seed", 0))
        rows = []
        for (checkpoint, layer), group in metrics.groupby(["checkpoint", "layer"], dropna=False, sort=True):
            values = group["value"].to_numpy(float)
            values = values[np.isfinite(values)]
            low, high = bootstrap_mean_ci(values, n_boot, level, seed)
            rows.append({"analysis": "layer-mi", "checkpoint": checkpoint, "metric": "mutual-info",
                         "layer": None if pd.isna(layer) else layer, "n": len(values), "statistic": "mi_bits",
                         "estimate": float(values.mean()) if len(values) else math.nan, "p": math.nan,
                         "ci_low": low, "ci_high": high})
        return pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "ci_low", "ci_high"])


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="activation-entropy", factory=ActivationEntropy, needs="activations", higher_is_more_fluent=False,
            description="Shannon entropy (bits) of the histogram of an image's activations in each layer.\n"
                        "Equal-width bins over [min, max] of that image's activations in that layer (scale-"
                        "invariant); a constant response has entropy 0. Lower entropy is read as a more "
                        "economical code, hence more fluent (higher_is_more_fluent=False).",
            options={"layers": LAYERS_OPTION,
                     "bins": Option("int", 64, "number of equal-width bins over [min, max]", minimum=2),
                     "correction": Option("str", "none", "bias correction: none (plug-in) or miller-madow",
                                          choices=("none", "miller-madow"))}),
        MetricSpec(
            name="mutual-info", factory=PointwiseMI, needs="images", reads_layers=True, higher_is_more_fluent=None,
            description="Local mutual information (bits) between an image's pixels and its response in each layer.\n"
                        "Relative to the stimulus set: pixels and responses are randomly projected, reduced by PCA, "
                        "and i = log p(x,y) − log p(x) − log p(y) is estimated (Gaussian or KSG); its mean over the "
                        "images is the MI (analysis layer-mi). Needs at least 2·dims + 2 images.",
            options={"layers": LAYERS_OPTION,
                     "project": Option("int", 64, "random-projection dimension kept per image and layer", minimum=1),
                     "dims": Option("int", 8, "principal components kept for the pixels and for each layer",
                                    minimum=1),
                     "estimator": Option("str", "gaussian", "gaussian (empirical covariance) or ksg (Kraskov et al. "
                                         "2004, estimator 1)", choices=("gaussian", "ksg")),
                     "k": Option("int", 3, "neighbours of the KSG estimator", minimum=1)}),
    ]


@hookimpl
def fluency_register_analyses() -> list[AnalysisSpec]:
    return [AnalysisSpec(
        name="layer-mi", factory=LayerMI,
        effects=(EffectSize("mi_bits", label="I (bits)", kind="descriptive", range=None, directional=False),),
        description="Mutual information (bits) between the images and each layer: mean of mutual-info, bootstrap CI.\n"
                    "Needs --metric mutual-info in the same run; descriptive (p is NaN); does not use the ratings.",
        options={"n_boot": Option("int", 2000, "bootstrap resamples of the images (0: no interval)", minimum=0),
                 "ci": Option("float", 0.95, "confidence level of the interval", minimum=0.5, maximum=0.999),
                 "seed": Option("int", 0, "seed of the bootstrap resampling")})]
