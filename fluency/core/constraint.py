"""The contract of a Constraint plugin: a penalty on activations added to the training loss.

During training, fluency captures (without detaching) the layers each constraint
names and calls it once per step; the returned scalar is added to the loss, and its
value is logged every step under the constraint's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fluency.core.architecture import FluencyVAE


class Constraint:
    """Base class of constraints. Conventional options: ``weight`` (θ) and ``layers`` (list or None)."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def layers(self, model: FluencyVAE) -> list[str]:
        """Names of the layers whose activations :meth:`penalty` reads."""
        chosen = self.options.get("layers")
        return list(chosen) if chosen else list(model.default_metric_layers)

    def penalty(self, activations: Mapping[str, torch.Tensor], model: FluencyVAE) -> torch.Tensor:
        """The unweighted penalty (a scalar tensor, differentiable) for one batch."""
        raise NotImplementedError

    def __call__(self, activations: Mapping[str, torch.Tensor], model: FluencyVAE) -> torch.Tensor:
        """θ × :meth:`penalty`."""
        return float(self.options.get("weight", 1.0)) * self.penalty(activations, model)
