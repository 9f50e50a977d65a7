"""Optimizer ``sam``: sharpness-aware minimisation (Foret et al. 2021) around any base optimizer.

Each step (always with a closure): evaluate the loss and its gradient g at W; move to
W + ε̂ with ε̂ = ρ·g/(‖g‖₂ + 1e-12), one L2 norm over every parameter that has a gradient,
or, with ``adaptive`` (ASAM, Kwon et al. 2021; use a ~10× larger ρ), ε̂ = ρ·W²⊙g/‖|W|⊙g‖₂;
evaluate the gradient there; restore W and let the base optimizer step with that second
gradient. The base optimizer is another optimizer plugin (``base``, default ``adam``); the
loss returned is the first (unperturbed) one.

BatchNorm running statistics must be updated by the first pass only. The optimizer sees
parameters, not modules, so the factory takes an extra keyword ``model=`` (fluency's
training loop passes the model it trains): during the second closure call every
BatchNorm of that model runs with momentum 0 and its buffers are restored afterwards.
Without ``model`` a warning says that the statistics are updated twice per step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fluency import Option, OptimizerSpec, hookimpl
from fluency.api import FluencyError, OptionError

EPS = 1e-12


class SAM(torch.optim.Optimizer):
    """SAM around the optimizer ``base``.

    ``param_groups`` is the base's own list (each group also holds ``rho`` and
    ``adaptive``), so an LR scheduler built on the SAM optimizer changes the base's
    learning rate; ``state_dict``/``load_state_dict`` are the base's (SAM keeps no
    state between steps).
    """

    #: SAM evaluates the loss itself, twice per step, so it cannot be stepped without a closure (by
    #: ``fluency train --amp fp16``'s gradient scaler)
    requires_closure = True

    def __init__(self, base: torch.optim.Optimizer, *, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None) -> None:
        if isinstance(base, SAM):
            raise OptionError("optimizer 'sam': the base optimizer cannot be sam itself")
        if rho < 0:
            raise OptionError(f"optimizer 'sam': rho must be >= 0, got {rho}")
        params = [p for group in base.param_groups for p in group["params"]]
        super().__init__(params, {"rho": rho, "adaptive": adaptive})
        self.base = base
        self.param_groups = base.param_groups  # shared: schedulers and resumes act on the base
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        self.model = model
        if model is None:
            warnings.warn("optimizer 'sam' was built without model=..., so BatchNorm running statistics are "
                          "updated on both passes of every step", UserWarning, stacklevel=2)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter that has a gradient to W + ε̂, remembering W."""
        scaled = [(p, torch.abs(p) * p.grad if group["adaptive"] else p.grad)
                  for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not scaled:
            return
        device = scaled[0][0].device
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(device) for _, g in scaled]))
        for group in self.param_groups:
            scale = group["rho"] / (norm + EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = (p * p * p.grad if group["adaptive"] else p.grad) * scale.to(p.device)
                p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        """Put W back and let the base optimizer step with the gradient taken at W + ε̂."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)
        self.base.step()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """closure() at W, :meth:`first_step`, closure() at W + ε̂ (BatchNorm frozen), :meth:`second_step`.

        Returns the loss of the first, unperturbed, pass.
        """
        if closure is None:
            raise FluencyError("optimizer 'sam' needs a closure: call optimizer.step(closure), the closure "
                               "zeroing the gradients, running forward and backward and returning the loss")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        self.zero_grad()  # the second gradient alone, even if the closure does not zero gradients
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
            if self.model is not None else []
        saved = [(m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
                 for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            with torch.enable_grad():
                closure()
        finally:
            with torch.no_grad():
                for m, (momentum, buffers) in zip(norms, saved):
                    m.momentum = momentum
                    for key, value in buffers.items():  # also undoes num_batches_tracked += 1
                        getattr(m, key).copy_(value)
        self.second_step()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base (with the base's defaults) and give it SAM's ``rho``/``adaptive``."""
        if not hasattr(self, "base"):  # called by Optimizer.__init__ before the base is attached
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        self.param_groups[-1].setdefault("rho", self.defaults["rho"])
        self.param_groups[-1].setdefault("adaptive", self.defaults["adaptive"])

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict (its groups carry ``rho`` and ``adaptive``)."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base and share its (new) ``param_groups`` list again."""
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups


def build_sam(params: Iterable[nn.Parameter], rho: float = 0.05, adaptive: bool = False, base: str = "adam",
              lr: float | None = None, weight_decay: float | None = None, momentum: float | None = None,
              model: nn.Module | None = None, **_: Any) -> SAM:
    """SAM around the optimizer plugin ``base``, built with its registry defaults.

    ``lr``, ``weight_decay`` and ``momentum`` (when set) override the base's options of
    the same name; one the base does not declare is ignored with a warning. ``model`` is
    the module being trained, used only to keep its BatchNorm statistics to one update per
    step (fluency's training loop passes it).
    """
    from fluency.api import get_plugin_manager

    if base == "sam":
        raise OptionError("optimizer 'sam': the base optimizer cannot be sam itself")
    manager = get_plugin_manager()
    spec = manager.get("optimizer", base)
    given = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}
    overrides = {k: v for k, v in given.items() if v is not None and k in spec.options}
    ignored = sorted(k for k, v in given.items() if v is not None and k not in spec.options)
    if ignored:
        warnings.warn(f"optimizer 'sam': base {base!r} has no option {', '.join(ignored)}; ignored",
                      UserWarning, stacklevel=2)
    base_opt = spec.load()(list(params), **spec.resolve(manager.option_defaults("optimizer", base), overrides))
    if not isinstance(base_opt, torch.optim.Optimizer):
        raise OptionError(f"optimizer 'sam': base {base!r} did not build a torch.optim.Optimizer")
    return SAM(base_opt, rho=rho, adaptive=adaptive, model=model)


@hookimpl
def fluency_register_optimizers() -> list[OptimizerSpec]:
    return [OptimizerSpec(
        name="sam", factory=build_sam,
        description="Sharpness-aware minimisation (Foret et al. 2021) around a base optimizer; ASAM with adaptive.",
        options={"rho": Option("float", 0.05, "neighbourhood radius ρ", minimum=0.0),
                 "adaptive": Option("bool", False, "adaptive SAM (ASAM, ε̂ = ρ·w²⊙g/‖|w|⊙g‖); use a ~10x larger rho"),
                 "base": Option("str", "adam", "the optimizer plugin that takes the steps (not sam)"),
                 "lr": Option("float", None, "learning rate of the base (unset: the base's default)", minimum=0.0),
                 "weight_decay": Option("float", None, "weight decay of the base (unset: the base's default)",
                                        minimum=0.0),
                 "momentum": Option("float", None, "momentum of the base, if it has one (sgd)",
                                    minimum=0.0, maximum=1.0)})]
