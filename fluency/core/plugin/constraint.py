"""The contract of a Constraint plugin: a penalty on activations added to the training loss.

During training, fluency captures (without detaching) the layers each constraint
names and calls it once per step; the returned scalar is added to the loss, and its
value is logged every step under the constraint's name. Training also logs, per constrained layer, the
mean activation the constraint acts on (:meth:`Constraint.mean_activation`, history column
``mean_act[LAYER]``) and records it in the checkpoint beside the constraint's :attr:`Constraint.target`,
so that ``fluency run`` can warn when a constraint with a target did not take effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fluency.core.errors import FluencyError
from fluency.core.plugin.options import Option

if TYPE_CHECKING:  # torch loads when a penalty is computed: a plugin module that subclasses Constraint lists fast
    import torch

    from fluency.core.plugin.architecture import FluencyModel


class Constraint:
    """Base class of constraints. Conventional options: ``weight`` (θ) and ``layers`` (list or None)."""

    #: the mean activation the constraint aims at (``kl-sparsity``'s ρ), or None for one without a target
    target: float | None = None
    #: how :meth:`mean_activation` measures a layer, for messages and the checkpoint (e.g. "mean |x|")
    activity: str = "mean |x|"

    def __init__(self, **options: Any) -> None:
        self.options = options

    def mean_activation(self, x: torch.Tensor) -> float:
        """The mean activation of a batch of one layer as the constraint sees it (default: mean |x|), compared
        with :attr:`target`; no gradient."""
        return float(x.detach().float().abs().mean())

    def layers(self, model: FluencyModel) -> list[str]:
        """Names of the layers whose activations :meth:`penalty` reads."""
        chosen = self.options.get("layers")
        return list(chosen) if chosen else list(model.default_metric_layers)

    def penalty(self, activations: Mapping[str, torch.Tensor], model: FluencyModel) -> torch.Tensor:
        """The unweighted penalty (a scalar tensor, differentiable) for one batch."""
        raise NotImplementedError

    def __call__(self, activations: Mapping[str, torch.Tensor], model: FluencyModel) -> torch.Tensor:
        """θ × :meth:`penalty`."""
        return float(self.options.get("weight", 1.0)) * self.penalty(activations, model)


def weight_option() -> dict[str, Option]:
    """The ``weight`` option every built-in constraint has: θ, the factor of its penalty in the loss."""
    return {"weight": Option("float", 1.0, "θ, the factor of the penalty in the loss", minimum=0.0)}


def require_layers(activations: Mapping[str, torch.Tensor], names: list[str], who: str) -> list[torch.Tensor]:
    """The captured activations of ``names``, or a :class:`FluencyError` naming the missing ones."""
    missing = [n for n in names if n not in activations]
    if missing:
        raise FluencyError(f"{who}: layer(s) {missing} were not captured; captured: {sorted(activations)}")
    if not names:
        raise FluencyError(f"{who}: no layers chosen (set its 'layers' option)")
    return [activations[n] for n in names]


def batch_l1(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mean over the batch of each image's L1 norm (÷ units per image when ``normalize``)."""
    flat = x.flatten(1) if x.ndim > 1 else x[:, None]
    norms = flat.abs().sum(dim=1)
    if normalize:
        norms = norms / max(flat.shape[1], 1)
    return norms.mean()


class L1Penalty(Constraint):
    """Σ over the chosen layers of the batch-mean L1 norm of each image's values (``l1-activation``,
    ``l1-attention``); subclasses set ``name`` and the default of the ``normalize`` option."""

    name = "l1"
    #: default of the ``normalize`` option when it is not given
    normalize_default = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        normalize = self.options.get("normalize")
        self.normalize = self.normalize_default if normalize is None else bool(normalize)

    def penalty(self, activations: Mapping[str, torch.Tensor], model: FluencyModel) -> torch.Tensor:
        import torch

        terms = [batch_l1(x, self.normalize) for x in require_layers(activations, self.layers(model), self.name)]
        return torch.stack(terms).sum() if len(terms) > 1 else terms[0]
