"""fluency: test processing-fluency theory with brain-like VAEs.

Public API for users and plugin authors::

    import fluency
    result = fluency.run(metrics=["gini", "sam"])      # the embedded default
    result.metrics, result.analyses["pearson"], result.path

    from fluency import hookimpl, MetricSpec, Option   # writing a plugin
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from fluency.core.analysis import Analysis, AnalysisData
from fluency.core.errors import FluencyError
from fluency.core.hookspecs import hookimpl
from fluency.core.metric import FluencyMetric, MetricBatch, MetricValues, units_as_rows
from fluency.core.options import Option
from fluency.core.specs import AnalysisSpec, ArchitectureSpec, ConstraintSpec, MetricSpec, OptimizerSpec

if TYPE_CHECKING:
    from fluency.core.runner import RunResult


def run(**kwargs: Any) -> "RunResult":
    """Run metrics (and analyses) like ``fluency run``; see :func:`fluency.core.runner.run`."""
    from fluency.core.runner import run as _run

    return _run(**kwargs)


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
    "Option",
    "OptimizerSpec",
    "__version__",
    "hookimpl",
    "run",
    "units_as_rows",
]
