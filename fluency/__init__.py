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

import inspect
from collections.abc import Sequence
from dataclasses import MISSING, fields
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


def run(**settings: Any) -> RunResult:
    """Compute per-image fluency metrics and relate them to ratings, as ``fluency run`` does: the run folder
    with metrics.parquet, analyses/, the activation store, figures and report.html; returns a
    :class:`~fluency.core.run.folder.RunResult` (``.metrics``, ``.analyses``, ``.strongest(n)``, ``.path``).

    With neither ``images`` nor ``checkpoints`` nor ``models`` it runs on the embedded default. Every
    option of the command line is a keyword (lists for repeatable options):

    - what: ``metrics`` (required, e.g. ``["gini", "sam"]``), ``analyses`` (default pearson and spearman
      with ratings), ``layers``, ``options`` (``"[KIND.]PLUGIN.KEY=VALUE"`` strings as for ``-o``),
      ``config`` (a TOML file), ``covariates`` (image statistics controlled for; default True);
    - on what: ``images`` (a folder), ``ratings`` (a CSV or Parquet table) with ``id_column`` and
      ``rating_column``, ``checkpoints`` (paths, globs such as ``"runs/*/final.pt"`` or folders),
      ``checkpoints_from`` (a text file listing them), ``models`` (architectures without a checkpoint, e.g.
      ``"vgg16-imagenet"``), ``match_group`` (ratings columns: each image measured only by the model trained
      on its subgroup), ``strict`` (an unreadable image or unrated id stops the run), ``fail_fast`` (an
      unloadable checkpoint or a failed task stops the run instead of being skipped);
    - subgroups and reliability: ``by`` (rating-table columns), ``min_group_size``, ``rater_ratings``
      (per-rater table: the noise ceiling), ``rater_column``, ``reliability_splits``;
    - where and how: ``out`` (default a new ``runs/`` folder), ``overwrite``, ``device``, ``batch_size``,
      ``seed``, ``deterministic``, ``store`` (keep activations), ``store_dtype``, ``store_layers``,
      ``check_fit`` (compare the stimuli's reconstruction error with the model's validation error even when
      no metric decodes);
    - units of work: ``shard_size`` (images per task), ``force`` (recompute parts an earlier run of ``out``
      left; without it, an ``out`` holding the same run is continued), ``executor`` (``"local"``, ``"dask"``,
      ``"slurm"``), ``workers``, ``scheduler`` (a Dask address), ``threads`` (torch threads per task),
      ``retries``, ``slurm`` (``"KEY=VALUE"`` settings over the config's ``[slurm]`` table);
    - outputs: ``figures`` (model figures; default True), ``interpolate`` (``"ID_A,ID_B"`` pairs),
      ``report`` (report.html as the last step; default True), ``progress`` (progress bars on stderr),
      ``console`` (a :class:`rich.console.Console` for them).
    """
    from fluency.jobs import run as _run

    return _run(**settings)


def _run_signature() -> inspect.Signature:
    """``run``'s keywords: every field of :class:`~fluency.core.run.config.RunConfig` and the outputs' switches,
    so that ``help(fluency.run)`` shows the real settings (read from the one place that defines them)."""
    from fluency.core.run.config import RunConfig

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(f.name, keyword, annotation=f.type,
                                **({} if f.default is MISSING else {"default": f.default}))
              for f in fields(RunConfig)]
    params += [inspect.Parameter("figures", keyword, default=True, annotation="bool"),
               inspect.Parameter("interpolate", keyword, default=(), annotation="Sequence[str]"),
               inspect.Parameter("report", keyword, default=True, annotation="bool"),
               inspect.Parameter("progress", keyword, default=True, annotation="bool"),
               inspect.Parameter("console", keyword, default=None, annotation="Console | None")]
    return inspect.Signature(params, return_annotation="RunResult")


run.__signature__ = _run_signature()  # type: ignore[attr-defined]


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
