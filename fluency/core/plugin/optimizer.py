"""The contract of an Optimizer plugin: a factory of ``torch.optim.Optimizer`` stepped with a closure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch


class OptimizerFactory(Protocol):
    """What an :class:`~fluency.core.plugin.specs.OptimizerSpec`'s factory is.

    ``factory(params, **options)`` returns an optimizer over ``params`` (the model's parameters) with the
    spec's validated options; a factory that also declares a ``model`` keyword gets the model (SAM uses it
    to protect BatchNorm statistics). fluency always calls ``optimizer.step(closure)``, where the closure
    zeroes the gradients, computes the loss, backpropagates and returns it, so a method may evaluate
    the loss more than once per step.
    """

    def __call__(self, params: Iterable[torch.nn.Parameter], /, **options: Any) -> torch.optim.Optimizer:
        """An optimizer over ``params``."""
        ...
