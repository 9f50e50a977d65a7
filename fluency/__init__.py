"""fluency: test processing-fluency theory with brain-like VAEs.

Public API for users and plugin authors::

    import fluency
    result = fluency.run(metrics=["gini", "sam"])      # the embedded default
    result.metrics, result.analyses["pearson"], result.path
    fluency.measure(result.path, metrics=["hoyer"])    # a new metric on the run's activation store
    store = fluency.open_store(result.path / "activations" / "default")

    from fluency import hookimpl, MetricSpec, Option   # writing a plugin
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluency.core.errors import FluencyError
from fluency.core.plugin.analysis import Analysis, AnalysisData
from fluency.core.plugin.hookspecs import hookimpl
from fluency.core.plugin.metric import FluencyMetric, MetricBatch, MetricValues, ModelDescription, units_as_rows
from fluency.core.plugin.options import Option
from fluency.core.plugin.specs import AnalysisSpec, ArchitectureSpec, ConstraintSpec, MetricSpec, OptimizerSpec
from fluency.core.version import __version__

if TYPE_CHECKING:
    from fluency.core.run.folder import RunResult
    from fluency.core.run.store import ActivationStore


def run(**kwargs: Any) -> RunResult:
    """Run metrics (and analyses) like ``fluency run``, with its figures; see :func:`fluency.jobs.run`."""
    from fluency.jobs import run as _run

    return _run(**kwargs)


def measure(target: str | Path, metrics: Sequence[str], **kwargs: Any) -> RunResult:
    """Measure activation metrics from a store or run folder like ``fluency measure``; see
    :func:`fluency.core.run.measure.measure`."""
    from fluency.jobs import measure as _measure

    return _measure(str(target), metrics, **kwargs)


def open_store(path: str | Path) -> ActivationStore:
    """Open a complete activation store for reading: ``layers``, ``shape(layer)``, ``image_ids``, ``provenance``,
    ``description``, and per-layer batches as numpy (``iter_batches``) or torch (``iter_torch``) views."""
    from fluency.core.run.store import ActivationStore

    return ActivationStore(path)


__all__ = [
    "Analysis",
    "AnalysisData",
    "AnalysisSpec",
    "ArchitectureSpec",
    "ConstraintSpec",
    "FluencyError",
    "FluencyMetric",
    "MetricBatch",
    "MetricSpec",
    "MetricValues",
    "ModelDescription",
    "Option",
    "OptimizerSpec",
    "__version__",
    "hookimpl",
    "measure",
    "open_store",
    "run",
    "units_as_rows",
]
