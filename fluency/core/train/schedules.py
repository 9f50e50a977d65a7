"""Learning-rate schedules for training (``--schedule``), built from torch's own schedulers.

Convention: the scheduler is stepped once per optimizer step (``optimizer.step(closure)``
then ``scheduler.step()``), not once per epoch, so every length below is converted from
epochs to steps with ``steps_per_epoch``. A SAM step counts as one step.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, StepLR

from fluency.core.errors import OptionError

SCHEDULES = ("none", "cosine", "step", "linear-warmup-cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, epochs: int, steps_per_epoch: int,
                    step_size: int | None = None, gamma: float = 0.1,
                    warmup_epochs: int = 1) -> LRScheduler | None:
    """The scheduler ``name`` (one of :data:`SCHEDULES`) over ``epochs × steps_per_epoch`` steps.

    * ``none``: ``None`` (constant learning rate);
    * ``cosine``: cosine from the optimizer's learning rate to 0 at the last step;
    * ``step``: × ``gamma`` every ``step_size`` epochs (default: a third of the run);
    * ``linear-warmup-cosine``: rises linearly over ``warmup_epochs`` (lr·k/W at the
      k-th of W warm-up steps, so the first step does not use the full rate), then
      cosine to 0 at the last step.

    Step it once per optimizer step (see the module docstring).
    """
    if name not in SCHEDULES:
        raise OptionError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    if epochs < 1 or steps_per_epoch < 1:
        raise OptionError(f"schedule {name!r}: epochs and steps_per_epoch must be >= 1 "
                          f"(got {epochs} and {steps_per_epoch})")
    total = epochs * steps_per_epoch
    if name == "none":
        return None
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
    if name == "step":
        size = max(1, epochs // 3) if step_size is None else step_size
        if size < 1:
            raise OptionError(f"schedule 'step': step_size must be >= 1 epoch, got {size}")
        return StepLR(optimizer, step_size=size * steps_per_epoch, gamma=gamma)
    # linear-warmup-cosine; a closed form in LambdaLR (SequentialLR warns and is fragile on resume)
    if warmup_epochs < 0:
        raise OptionError(f"schedule {name!r}: warmup_epochs must be >= 0, got {warmup_epochs}")
    warm = min(warmup_epochs * steps_per_epoch, total)
    decay = max(1, total - warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, decay) / decay))

    return LambdaLR(optimizer, factor)
