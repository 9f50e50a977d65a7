"""Options shared by the economy metrics: per-channel values and the "all layers" value.

A per-layer sparsity metric (``gini``, ``hoyer``, ``lepsilon``) can report, besides one value
per layer, one value per image over *all* chosen layers (layer name ``"all"``). How the
layers are weighted is a scientific choice, so it is an option:

* ``layer_weighting="units"`` (pooled): the metric of all units together, every unit
  counting once, so a 32×32×32 layer outweighs a 512-unit one 64 to 1 (for ``gini``, the
  Gini of the concatenated layers; this is what the original study computed);
* ``layer_weighting="equal"``: the mean of the per-layer values, every layer counting once;
* ``layer_weights=[w1, w2, ...]``: a weighted mean of the per-layer values, one weight per
  chosen layer in order (overrides ``layer_weighting``).

``per="channel"`` computes the metric over each channel's feature map (the spatial
positions of one filter) and averages the channels of a layer: it asks "is each feature
map sparse?" rather than "is the layer's code sparse?" ("per="image"", the default).
Lifetime sparsity (one unit across images) is not a per-image value; the activation
histograms of the report show it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fluency.core.errors import FluencyError
from fluency.core.plugin.options import Option

#: layer name of a metric's value over all chosen layers
ALL_LAYERS = "all"
WEIGHTINGS = ("units", "equal")
PER = ("image", "channel")


def all_layers_options(default: bool) -> dict[str, Option]:
    """The option table of the "all layers" value (``all_layers``, ``layer_weighting``, ``layer_weights``)."""
    return {
        "all_layers": Option("bool", default, "also report the value over all chosen layers per image (layer 'all'; "
                             "only with 2+ layers)"),
        "layer_weighting": Option("str", "units", "weighting of the 'all' value: units (pooled, every unit counts "
                                  "once: larger layers weigh more) or equal (mean of the per-layer values)",
                                  choices=WEIGHTINGS),
        "layer_weights": Option("list[float]", None, "weights of a weighted mean of the per-layer values for 'all', "
                                "one per chosen layer in order (overrides layer_weighting)"),
    }


def per_option(what: str) -> dict[str, Option]:
    """The ``per`` option: ``image`` (the whole layer) or ``channel`` (mean of per-feature-map values)."""
    return {"per": Option("str", "image", f"image: {what} over the whole layer; channel: mean over the layer's "
                          f"channels of the {what} of each feature map", choices=PER)}


def wants_all_layers(options: Mapping[str, Any], names: Sequence[str], default: bool) -> bool:
    """Whether to report the "all" value: asked for (or by default) and more than one layer chosen."""
    flag = options.get("all_layers")
    return (default if flag is None else bool(flag)) and len(names) > 1


def layer_weights(metric: str, options: Mapping[str, Any], names: Sequence[str]) -> list[float] | None:
    """The weights of the per-layer values in the "all" value, or None for the pooled ("units") value."""
    weights = options.get("layer_weights")
    if weights:
        weights = [float(w) for w in weights]
        if len(weights) != len(names):
            raise FluencyError(f"{metric}: layer_weights has {len(weights)} values for the {len(names)} layers "
                               f"{list(names)}; give one weight per layer, in that order")
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise FluencyError(f"{metric}: layer_weights must be finite, >= 0 and not all 0 (got {weights})")
        return weights
    weighting = options.get("layer_weighting") or "units"
    if weighting not in WEIGHTINGS:
        raise FluencyError(f"{metric}: layer_weighting={weighting!r}; use one of {list(WEIGHTINGS)}")
    return None if weighting == "units" else [1.0] * len(names)


def weighted_mean(values: Sequence[np.ndarray | torch.Tensor], weights: Sequence[float]) -> np.ndarray:
    """Σ_l w_l · v_l / Σ_l w_l per image, in float64, for per-layer value vectors of one batch."""
    stacked = np.stack([v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float64)
                        for v in values])
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * stacked).sum(axis=0) / w.sum()


def channel_rows(activations: torch.Tensor) -> tuple[torch.Tensor, int]:
    """B×C×… activations as (B·C)×(spatial) rows, one per feature map, and C; a B×N layer is one channel per unit
    only in name, so it is an error (per="channel" needs a convolutional layer)."""
    if activations.dim() < 3:
        raise FluencyError(f"per='channel' needs a convolutional layer (B×C×H×W); this one is "
                           f"{tuple(activations.shape)}: use per='image'")
    b, c = activations.shape[:2]
    return activations.reshape(b * c, -1), c
