"""Optimizer ``sgd``: stochastic gradient descent with optional (Nesterov) momentum."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fluency import Option, OptimizerSpec, hookimpl
from fluency.api import OptionError


def build_sgd(params: Iterable[torch.nn.Parameter], lr: float = 0.01, momentum: float = 0.9, nesterov: bool = False,
              weight_decay: float = 0.0, **_: Any) -> torch.optim.Optimizer:
    """``torch.optim.SGD``; Nesterov needs a momentum above 0."""
    if nesterov and momentum <= 0:
        raise OptionError("optimizer 'sgd': nesterov = true needs momentum > 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


@hookimpl
def fluency_register_optimizers() -> list[OptimizerSpec]:
    return [OptimizerSpec(
        name="sgd", factory=build_sgd, description="SGD with optional (Nesterov) momentum.",
        options={"lr": Option("float", 0.01, "learning rate", minimum=0.0),
                 "momentum": Option("float", 0.9, "momentum", minimum=0.0, maximum=1.0),
                 "nesterov": Option("bool", False, "Nesterov momentum"),
                 "weight_decay": Option("float", 0.0, "L2 penalty", minimum=0.0)})]
