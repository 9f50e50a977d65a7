"""What a plugin registers: one spec per named thing it provides.

A spec is cheap to build (registration must not import torch models or load
weights): it carries the name, a one-line description, the typed options and a
*factory*, either a callable or a lazy ``"module:attribute"`` string that is
imported only when the plugin is used.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from fluency.core.errors import FluencyError
from fluency.core.plugin.analysis import EffectSize
from fluency.core.plugin.options import Option, resolve_options

Kind = Literal["architecture", "constraint", "optimizer", "metric", "analysis"]
KINDS: tuple[Kind, ...] = ("architecture", "constraint", "optimizer", "metric", "analysis")

#: what a metric may need: activations only, the images too, or the model with its loss
NEEDS = ("activations", "images", "model")
#: what a model may provide: a ``decode`` (image from latent), a ``latent`` code per image, a training
#: ``objective`` (per-image loss terms), an exact ``inverse`` (latent back to image)
CAPABILITIES = ("decoder", "latent", "objective", "inverse")
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginSpec:
    """Base of the five spec kinds; use one of the subclasses."""

    kind: ClassVar[Kind]
    name: str
    factory: Callable[..., Any] | str
    description: str = ""
    options: Mapping[str, Option] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``ValueError`` if the spec is malformed (bad name, options or factory)."""
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"invalid {self.kind} name {self.name!r}: use lowercase letters, digits, '-' or '_'")
        if not (callable(self.factory) or (isinstance(self.factory, str) and ":" in self.factory)):
            raise ValueError(f"{self.kind} {self.name!r}: factory must be a callable or 'module:attribute'")
        for key, opt in self.options.items():
            if not isinstance(opt, Option):
                raise ValueError(f"{self.kind} {self.name!r}: option {key!r} is not a fluency Option")
            try:  # a default that fails its own type, choices or bounds is the plugin's error, not the user's
                opt.validate(opt.default, f"{self.kind} {self.name!r}: the default of option {key!r}")
            except FluencyError as exc:
                raise ValueError(str(exc)) from None

    def load(self) -> Callable[..., Any]:
        """Return the factory, importing it first if it is a ``"module:attribute"`` string."""
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def resolve(self, *layers: Mapping[str, Any]) -> dict[str, Any]:
        """Validated options: declared defaults overlaid by ``layers`` (lowest priority first)."""
        return resolve_options(self.options, layers, f"{self.kind} {self.name!r}")

    @property
    def summary(self) -> str:
        """First line of the description."""
        return self.description.strip().splitlines()[0] if self.description.strip() else ""


@dataclass(frozen=True)
class ArchitectureSpec(PluginSpec):
    """A model family. ``factory(**options)`` returns a :class:`fluency.core.plugin.architecture.FluencyModel`
    (a VAE, a flow or an encoder-only model)."""

    kind: ClassVar[Kind] = "architecture"


@dataclass(frozen=True)
class ConstraintSpec(PluginSpec):
    """A training penalty. ``factory(**options)`` returns a :class:`fluency.core.plugin.constraint.Constraint`."""

    kind: ClassVar[Kind] = "constraint"


@dataclass(frozen=True)
class OptimizerSpec(PluginSpec):
    """An optimizer. The factory (:class:`fluency.core.plugin.optimizer.OptimizerFactory`) takes
    ``(params, **options)`` and returns a ``torch.optim.Optimizer`` stepped with a closure."""

    kind: ClassVar[Kind] = "optimizer"


@dataclass(frozen=True)
class MetricSpec(PluginSpec):
    """A per-image fluency metric. ``factory(**options)`` returns a :class:`fluency.core.plugin.metric.FluencyMetric`.

    ``needs`` says what the metric reads: ``"activations"`` (layer outputs only, from a run's
    live capture or from an activation store), ``"images"`` (the images as the model sees
    them, e.g. low-level statistics; ``fluency measure`` computes these only with
    ``--images``) or ``"model"`` (the model, the images and the loss: only in a run with the
    checkpoint).
    ``higher_is_more_fluent`` is ``True``, ``False`` or ``None`` (no direction): the one place a
    metric's direction is declared. ``reads_layers`` overrides whether activations are captured for
    it (default: only for ``needs="activations"``).
    """

    kind: ClassVar[Kind] = "metric"
    needs: Literal["activations", "images", "model"] = "activations"
    higher_is_more_fluent: bool | None = None
    reads_layers: bool | None = None
    requires: tuple[str, ...] = ()

    @property
    def reads_activations(self) -> bool:
        """Whether fluency captures (or reads from a store) the layers the metric's ``layers()`` names:
        ``reads_layers``, by default true exactly for ``needs="activations"``. A model or image metric
        reads none, with no ``layers()`` override needed."""
        return self.needs == "activations" if self.reads_layers is None else bool(self.reads_layers)

    def check(self) -> None:
        super().check()
        if self.needs not in NEEDS:
            raise ValueError(f"metric {self.name!r}: needs must be one of {list(NEEDS)}, not {self.needs!r}")
        unknown = [c for c in self.requires if c not in CAPABILITIES]
        if isinstance(self.requires, str) or unknown:
            raise ValueError(f"metric {self.name!r}: requires must be a tuple of {list(CAPABILITIES)}, "
                             f"not {self.requires!r}")
        if self.requires and self.needs != "model":
            raise ValueError(f"metric {self.name!r}: requires={self.requires!r} needs needs='model'")


@dataclass(frozen=True)
class AnalysisSpec(PluginSpec):
    """A statistical analysis. ``factory(**options)`` returns a :class:`fluency.core.plugin.analysis.Analysis`.

    ``effects`` declares, per ``statistic`` its results carry, how the summary and the report show it
    (:class:`fluency.core.plugin.analysis.EffectSize`): which statistic is an effect size, its kind (only
    correlations are ranked together), its range and whether its sign says something about fluency.
    A statistic without a declaration is listed in the report's tables only.
    """

    kind: ClassVar[Kind] = "analysis"
    effects: tuple[EffectSize, ...] = ()

    def check(self) -> None:
        super().check()
        if isinstance(self.effects, EffectSize) or not all(isinstance(e, EffectSize) for e in self.effects):
            raise ValueError(f"analysis {self.name!r}: effects must be a tuple of EffectSize")
        for effect in self.effects:
            effect.check(f"analysis {self.name!r}")


SPEC_TYPES: dict[Kind, type[PluginSpec]] = {
    "architecture": ArchitectureSpec,
    "constraint": ConstraintSpec,
    "optimizer": OptimizerSpec,
    "metric": MetricSpec,
    "analysis": AnalysisSpec,
}
