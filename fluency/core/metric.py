"""The contract of a FluencyMetric plugin.

A metric turns one batch of images into one value per image, per layer where it
is per-layer. It is called batch by batch and must not keep a whole dataset's
activations; a metric that needs a pass over everything first (a reference
distribution, say) collects a small state in :meth:`FluencyMetric.compute` and
returns its values from :meth:`FluencyMetric.finish`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fluency.core.architecture import FluencyVAE, VAEOutput


@dataclass
class MetricBatch:
    """Everything a metric may read about one batch.

    ``activations`` maps layer names to float32 tensors ``B×…`` (detached). Metrics
    whose spec ``needs="model"`` also get the model (in eval mode) and ``loss``, the
    checkpoint's training loss per image, ``loss(output, images) -> B``; call the model
    with ``sample=False`` (z = mu) so that the loss is deterministic.
    """

    image_ids: Sequence[str]
    images: torch.Tensor
    activations: Mapping[str, torch.Tensor] = field(default_factory=dict)
    model: FluencyVAE | None = None
    loss: Callable[[VAEOutput, torch.Tensor], torch.Tensor] | None = None
    seed: int = 0


@dataclass
class MetricValues:
    """One value per image of a batch for one (metric, layer); ``layer=None`` for whole-model values."""

    metric: str
    values: np.ndarray | torch.Tensor
    layer: str | None = None

    def as_numpy(self) -> np.ndarray:
        v = self.values.detach().cpu().double().numpy() if isinstance(self.values, torch.Tensor) else self.values
        return np.asarray(v, dtype=np.float64).reshape(-1)


def units_as_rows(activations: torch.Tensor) -> torch.Tensor:
    """A layer's B×… activations as B×N rows *in memory order*: a view, no copy, for contiguous and
    channels-last tensors (``flatten(1)`` copies a channels-last tensor to NCHW order first).

    For metrics that do not depend on the order of a layer's units (Gini, Hoyer, counts, norms);
    a per-channel or spatial computation must keep the B×C×H×W layout instead.
    """
    t = activations.detach()
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.flatten(1)


class FluencyMetric:
    """Base class of metrics. Subclasses take their validated options as keyword arguments.

    ``layers`` (a list of layer names or None) is conventional: None means the
    model's ``default_metric_layers``.
    """

    #: True when a larger value means the image is processed more fluently
    higher_is_more_fluent: ClassVar[bool | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    def layers(self, model: FluencyVAE) -> list[str]:
        """Names of the layers whose activations :meth:`compute` reads (empty: none)."""
        chosen = self.options.get("layers")
        return list(chosen) if chosen else list(model.default_metric_layers)

    def batch_layers(self, batch: MetricBatch) -> list[str]:
        """The layers to read in ``batch``: the ``layers`` option, else the model's defaults, else (no model,
        as in unit tests) every captured layer; a layer that was not captured is an error."""
        from fluency.core.errors import FluencyError

        if self.options.get("layers"):
            names = list(self.options["layers"])
        elif batch.model is not None:
            names = self.layers(batch.model)
        else:
            names = list(batch.activations)
        missing = [n for n in names if n not in batch.activations]
        if missing:
            raise FluencyError(f"{missing} not among the captured layers {sorted(batch.activations)}")
        return names

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        """Values for the images of ``batch``."""
        raise NotImplementedError

    def finish(self) -> list[tuple[Sequence[str], MetricValues]]:
        """Values that could only be computed after the last batch, as ``(image_ids, values)`` pairs."""
        return []

    def state(self) -> dict[str, Any] | None:
        """Fitted state to save with the run (tensors and plain types, loadable with ``weights_only=True``)."""
        return None
