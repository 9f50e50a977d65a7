"""The hooks a fluency plugin implements: one registration hook per plugin kind.

A plugin is a module (or object) with functions decorated by
:data:`fluency.hookimpl`. Each hook takes no arguments and returns a list of
specs of its kind; fluency calls every plugin's hooks once, at start-up, so the
hooks must be cheap: return specs with lazy ``"module:attribute"`` factories
rather than building models or loading weights.

Example::

    from fluency import hookimpl, MetricSpec, Option

    @hookimpl
    def fluency_register_metrics():
        return [MetricSpec(name="mi", factory="fluency_mi.metric:MutualInformation",
                           description="Mutual information between image and layer.",
                           options={"bins": Option("int", 32, "histogram bins")})]
"""

from __future__ import annotations

import pluggy

from fluency.core.plugin.specs import AnalysisSpec, ArchitectureSpec, ConstraintSpec, MetricSpec, OptimizerSpec

PROJECT = "fluency"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: hook name of each kind's registration hook
REGISTRATION_HOOKS = {
    "architecture": "fluency_register_architectures",
    "constraint": "fluency_register_constraints",
    "optimizer": "fluency_register_optimizers",
    "metric": "fluency_register_metrics",
    "analysis": "fluency_register_analyses",
}


@hookspec
def fluency_register_architectures() -> list[ArchitectureSpec]:
    """Return the model architectures (VAEs, flows or encoder-only models with named, hookable layers) this
    plugin provides."""


@hookspec
def fluency_register_constraints() -> list[ConstraintSpec]:
    """Return the training constraints (penalties added to the loss) this plugin provides."""


@hookspec
def fluency_register_optimizers() -> list[OptimizerSpec]:
    """Return the optimizers (stepped with a closure) this plugin provides."""


@hookspec
def fluency_register_metrics() -> list[MetricSpec]:
    """Return the per-image fluency metrics this plugin provides."""


@hookspec
def fluency_register_analyses() -> list[AnalysisSpec]:
    """Return the statistical analyses (metrics against ratings) this plugin provides."""
