"""The jobs a user runs, from Python or the command line: each pipeline with its outputs.

The pipelines in :mod:`fluency.core.run` compute and return results; the figures and the report
belong to the output layer. These functions put the two together, so that ``fluency.run`` in a
notebook and ``fluency run`` in a shell write the same folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluency.core.run.folder import RunResult


def run(*, figures: bool = True, report: bool = True, interpolate: Sequence[str | tuple[str, str]] = (),
        **settings: Any) -> RunResult:
    """``fluency run``: the metrics of every image and checkpoint, the analyses, (with ``figures``) each
    checkpoint's latents and model figures, with latent interpolations between the ``interpolate`` pairs
    (``"ID_A,ID_B"``), and (with ``report``) report.html as the last step. ``settings`` are the fields of
    :class:`fluency.core.run.config.RunConfig`."""
    from fluency.core.outputs.report import write_report
    from fluency.core.outputs.run_figures import ModelFigures
    from fluency.core.run.pipeline import run as run_pipeline

    return run_pipeline(observer=ModelFigures(interpolate) if figures else None,
                        report=write_report if report else None, **settings)


def measure(target: str, metrics: Sequence[str], *, report: bool | None = None, **settings: Any) -> RunResult:
    """``fluency measure``: activation metrics (then analyses) from a completed store or run folder, without
    the model; see :func:`fluency.core.run.measure.measure`. The report is rebuilt when ``report`` is true,
    or (None) when the folder already has one."""
    from fluency.core.outputs.report import build_report
    from fluency.core.run.measure import measure as measure_store

    had_report = (Path(settings["out"]) if settings.get("out") else Path(target)) / "report.html"
    had = had_report.exists()
    result = measure_store(target, metrics, **settings)
    if report or (report is None and had):
        build_report(result.path)
    return result
