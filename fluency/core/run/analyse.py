"""The analyses of a run: every analysis on the rated images (and within subgroups), p_fdr across all tests."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from fluency.core.atomic import atomic_path
from fluency.core.errors import FluencyError
from fluency.core.memory import release_memory
from fluency.core.plugin.analysis import FDR_COLUMNS, AnalysisData, EffectSize
from fluency.core.plugin.metric_columns import MetricColumns, as_columns
from fluency.core.plugin.manager import PluginManager, get_plugin_manager, guarded, read_registry
from fluency.core.plugin.specs import AnalysisSpec
from fluency.core.progress import progress_bar, step
from fluency.core.run.covariates import Covariates
from fluency.core.run.same_tests import SameTests, same_tests
from fluency.core.stats import fdr_bh


@dataclass
class AnalysisOutcome:
    """The result tables (one per analysis), the subgroup report and seconds per analysis."""

    results: dict[str, pd.DataFrame] = field(default_factory=dict)
    subgroups: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def subgroups(ratings: pd.DataFrame, by: Sequence[str], min_size: int) -> tuple[list[tuple[str, pd.DataFrame]],
                                                                                 list[dict[str, Any]]]:
    """``[("all", ratings), (label, rows), ...]`` and a size report; groups under ``min_size`` are left out."""
    missing = [c for c in by if c not in ratings.columns]
    if missing:
        raise FluencyError(f"--by {','.join(by)}: no column(s) {missing} in the ratings table "
                           f"(columns: {list(ratings.columns)})")
    groups: list[tuple[str, pd.DataFrame]] = [("all", ratings)]
    report: list[dict[str, Any]] = [{"group": "all", "n": len(ratings), "analysed": True}]
    for values, rows in ratings.groupby(list(by), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{c}={v}" for c, v in zip(by, values))
        ok = len(rows) >= min_size
        report.append({"group": label, "n": len(rows), "analysed": ok,
                       **({} if ok else {"note": f"fewer than --min-group-size {min_size} rated images"})})
        if ok:
            groups.append((label, rows))
    return groups, report


def default_analyses(n_checkpoints: int) -> list[str]:
    """The analyses of a run that names none: the registry's ``[run] default_analyses``, and its
    ``checkpoint_analyses`` (the paired comparison) when the run measures two or more checkpoints."""
    run = read_registry()["run"]
    extra = run.get("checkpoint_analyses", []) if n_checkpoints > 1 else []
    return list(dict.fromkeys([*run["default_analyses"], *extra]))


def analyse(metric_table: pd.DataFrame | MetricColumns, ratings: pd.DataFrame | None, rating_column: str,
            specs: Mapping[str, AnalysisSpec], resolved: Mapping[tuple[str, str], Mapping[str, Any]], out_dir: Path,
            manager: PluginManager, by: Sequence[str] = (), min_group_size: int = 10,
            console: Console | None = None, covariates: Covariates | None = None) -> AnalysisOutcome:
    """Run every analysis on the rated images (and within each ``by`` subgroup), add run-wide BH-corrected
    p-values across every test, write ``ratings.parquet`` and one ``analyses/<name>.parquet`` per analysis.
    With ``covariates``, the analyses get them as :attr:`AnalysisData.covariates` (and, unless requested as
    metrics, not as metrics to test)."""
    if ratings is None or not specs:
        return AnalysisOutcome()
    columns = as_columns(metric_table)
    columns, wide = covariates.split(columns) if covariates is not None else (columns, None)
    with atomic_path(out_dir / "ratings.parquet") as tmp:
        ratings.to_parquet(tmp, index=False)
    groups, report = subgroups(ratings, by, min_group_size) if by else ([("all", ratings)], [])
    outcome = AnalysisOutcome(subgroups={"by": list(by), "min_group_size": min_group_size, "groups": report}
                              if by else None)
    with progress_bar(console) as bars:
        task = bars.add_task("analyses", total=len(specs) * len(groups), status="")
        for name, spec in specs.items():
            t0 = time.perf_counter()
            analysis = guarded(manager, "analysis", name, lambda s=spec, n=name: s.load()(**resolved[("analysis", n)]))
            parts = []
            for label, rows in groups:
                bars.update(task, status=step(name, None if label == "all" else label))
                data = AnalysisData(columns.restrict(rows["image_id"]), rows, rating_column, wide)
                parts.append(guarded(manager, "analysis", name, lambda d=data: analysis.run(d)).assign(group=label))
                bars.advance(task)
            outcome.results[name] = pd.concat(parts, ignore_index=True)
            release_memory()  # what this analysis freed, back before the next one allocates (core/memory.py)
            outcome.timings[f"analysis[{name}]"] = round(time.perf_counter() - t0, 3)
        bars.update(task, status="")
    _write_with_fdr(outcome.results, out_dir / "analyses", same_tests(columns, ratings["image_id"]))
    return outcome


def effects_record(specs: Mapping[str, AnalysisSpec]) -> dict[str, list[dict[str, Any]]]:
    """The manifest's ``analysis_effects``: how each analysis declared its statistics are shown."""
    return {name: [effect.as_dict() for effect in spec.effects] for name, spec in specs.items()}


def read_effects(manifest: Mapping[str, Any], analyses: Sequence[str]) -> dict[tuple[str, str], EffectSize]:
    """``{(analysis, statistic): EffectSize}`` as the run recorded them; an analysis the manifest has no record
    of (a run written before effects were declared) takes the declaration of the installed plugin, if any."""
    recorded = dict(manifest.get("analysis_effects") or {})
    missing = [name for name in analyses if name not in recorded]
    if missing:
        manager = get_plugin_manager()
        for name in missing:
            if name in manager.names("analysis"):
                recorded[name] = [e.as_dict() for e in manager.get("analysis", name).effects]
    return {(name, str(e["statistic"])): EffectSize.from_dict(e) for name, effects in recorded.items()
            for e in effects}


def _write_with_fdr(results: dict[str, pd.DataFrame], folder: Path, same: SameTests | None = None) -> None:
    """Add ``p_fdr`` (Benjamini–Hochberg across every test of every analysis) and write one table each; tests
    controlled for the covariates (``p_adj``) are in the same family, their corrected values in ``p_adj_fdr``.

    With ``same``, a row that repeats another output's test is marked (``same_as``) and left out of the
    family, raw and adjusted: one hypothesis, one test (:mod:`fluency.core.run.same_tests`)."""
    repeated = {name: same.mark(r) if same is not None else pd.Series(False, index=r.index)
                for name, r in results.items()}
    family = [(name, p) for p in FDR_COLUMNS for name, r in results.items() if p in r.columns]
    sizes = [len(results[name]) for name, _ in family]
    pooled = (np.concatenate([results[name][p].mask(repeated[name]).to_numpy(float) for name, p in family])
              if sum(sizes) else [])
    p_fdr = fdr_bh(pooled) if sum(sizes) else []
    folder.mkdir(exist_ok=True)
    start = 0
    for (name, p), size in zip(family, sizes):
        results[name][FDR_COLUMNS[p]] = p_fdr[start:start + size]
        start += size
    for name, result in results.items():
        with atomic_path(folder / f"{name}.parquet") as tmp:
            result.to_parquet(tmp, index=False)
