"""Optimizer ``adamw``: Adam with decoupled weight decay (Loshchilov & Hutter 2019)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fluency import Option, OptimizerSpec, hookimpl


def build_adamw(params: Iterable[torch.nn.Parameter], lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                weight_decay: float = 0.01, **_: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW``; decay is applied to the weights directly, not through the gradient."""
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)


@hookimpl
def fluency_register_optimizers() -> list[OptimizerSpec]:
    return [OptimizerSpec(
        name="adamw", factory=build_adamw, description="AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019).",
        options={"lr": Option("float", 1e-3, "learning rate", minimum=0.0),
                 "beta1": Option("float", 0.9, "first-moment decay", minimum=0.0, maximum=1.0),
                 "beta2": Option("float", 0.999, "second-moment decay", minimum=0.0, maximum=1.0),
                 "weight_decay": Option("float", 0.01, "decoupled weight decay", minimum=0.0)})]
