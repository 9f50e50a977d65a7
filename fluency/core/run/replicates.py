"""Replicate models in a run: every analysis aggregated per configuration over its replicates.

Models trained from several seeds of one configuration (``fluency train --seeds``, or labelled with
``--replicate-of``) are analysed one by one like any checkpoint; then, for every configuration with at
least two replicates in the run and every test (analysis, subgroup, metric, layer, statistic), the
estimates of its replicates are summarised: how many, mean, SD (ddof = 1), min and max, the mean r² (of
r for a correlation, the mean R² for a cross-validated R²: the study's "mean r² over 10 models") and how
many replicates' tests have p_fdr < 0.05. The checkpoints' replicate records come from the manifest
(``inputs.checkpoints[i].replicate``, :func:`fluency.core.model.replicates.replicate_of`).

The table is ``RUN/analyses-replicates.parquet``: beside ``analyses/``, not in it, because everything
that reads ``analyses/*.parquet`` (the report, ``fluency measure``, queries over runs) takes each file
there for one analysis' per-checkpoint results, which these rows are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fluency.core.atomic import atomic_path
from fluency.core.plugin.analysis import EffectSize
from fluency.core.run.analyse import read_effects

REPLICATES = "analyses-replicates.parquet"
#: what identifies one test across the replicates of a configuration
KEYS = ("configuration", "analysis", "group", "metric", "layer", "statistic")
COLUMNS = (*KEYS, "kind", "n_models", "seeds", "mean", "sd", "min", "max", "mean_r2", "n_significant", "n_tested")
#: a replicate's test counts as significant below this p_fdr
ALPHA = 0.05


def replicate_checkpoints(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{label: {"configuration", "seed"}}`` of the run's checkpoints that carry a replicate record."""
    found: dict[str, dict[str, Any]] = {}
    inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), Mapping) else {}
    for entry in inputs.get("checkpoints") or []:
        record = entry.get("replicate") if isinstance(entry, Mapping) else None
        label = entry.get("label") if isinstance(entry, Mapping) else None
        if isinstance(record, Mapping) and isinstance(record.get("configuration"), str) and isinstance(label, str):
            found[label] = {"configuration": record["configuration"], "seed": record.get("seed")}
    return found


def configurations(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{configuration: [labels]}`` of the configurations with at least two replicates in the run."""
    groups: dict[str, list[str]] = {}
    for label, record in replicate_checkpoints(manifest).items():
        groups.setdefault(record["configuration"], []).append(label)
    return {name: labels for name, labels in groups.items() if len(labels) >= 2}


def aggregate(analyses: Mapping[str, pd.DataFrame], manifest: Mapping[str, Any],
              effects: Mapping[tuple[str, str], EffectSize] | None = None) -> pd.DataFrame:
    """One row per configuration (≥ 2 replicates) and test: :data:`COLUMNS`, in the analyses' order.

    ``effects`` (``{(analysis, statistic): EffectSize}``, default read from the manifest) gives each
    statistic's kind: ``mean_r2`` is the mean of r² for a correlation, the mean for an R², else NaN. A row
    that repeats another output's test (``same_as``) is left out, as in the summary."""
    owner = {label: name for name, labels in configurations(manifest).items() for label in labels}
    tables = [t for t in analyses.values() if len(t)]
    if not owner or not tables:
        return pd.DataFrame(columns=list(COLUMNS))
    table = pd.concat(tables, ignore_index=True)
    table = table[table["checkpoint"].isin(owner.keys())]
    if "same_as" in table.columns:
        table = table[table["same_as"].fillna("").astype(str).eq("")]
    if not len(table):
        return pd.DataFrame(columns=list(COLUMNS))
    effects = read_effects(manifest, list(analyses)) if effects is None else effects
    seeds = replicate_checkpoints(manifest)
    table = table.assign(configuration=table["checkpoint"].map(owner),
                         group=table["group"].fillna("all") if "group" in table.columns else "all",
                         seed=table["checkpoint"].map(lambda c: seeds[c]["seed"]),
                         p_fdr=table["p_fdr"] if "p_fdr" in table.columns else np.nan)
    rows = [_summarise(key, rows, effects) for key, rows in table.groupby(list(KEYS), dropna=False, sort=False)]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _summarise(key: tuple[Any, ...], rows: pd.DataFrame, effects: Mapping[tuple[str, str], EffectSize]
               ) -> dict[str, Any]:
    """The row of one configuration's test over its replicates (those with a finite estimate)."""
    named = dict(zip(KEYS, key))
    kind = getattr(effects.get((str(named["analysis"]), str(named["statistic"]))), "kind", None)
    finite = rows[np.isfinite(rows["estimate"].astype(float))]
    values = finite["estimate"].to_numpy(float)
    p_fdr = finite["p_fdr"].to_numpy(float)
    mean_r2 = (float(np.mean(values ** 2)) if kind == "correlation" else
               float(np.mean(values)) if kind == "r2" else np.nan) if len(values) else np.nan
    return {**named, "layer": None if pd.isna(named["layer"]) else named["layer"], "kind": kind,
            "n_models": len(values), "seeds": ",".join("?" if s is None or pd.isna(s) else str(int(s))
                                                       for s in sorted(finite["seed"], key=_seed_order)),
            "mean": float(np.mean(values)) if len(values) else np.nan,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else np.nan,
            "min": float(np.min(values)) if len(values) else np.nan,
            "max": float(np.max(values)) if len(values) else np.nan, "mean_r2": mean_r2,
            "n_significant": int((p_fdr < ALPHA).sum()), "n_tested": int(np.isfinite(p_fdr).sum())}


def _seed_order(seed: Any) -> float:
    return float("inf") if seed is None or pd.isna(seed) else float(seed)


def write_replicates(run_dir: str | Path, analyses: Mapping[str, pd.DataFrame], manifest: Mapping[str, Any],
                     effects: Mapping[tuple[str, str], EffectSize] | None = None) -> Path | None:
    """Write ``RUN/analyses-replicates.parquet`` (:func:`aggregate`) and return its path; without a configuration
    of two or more replicates, remove an earlier one (analyses recomputed since) and return None. The caller
    holds the run folder's lock, as for the analyses."""
    path = Path(run_dir) / REPLICATES
    table = aggregate(analyses, manifest, effects)
    if not len(table):
        path.unlink(missing_ok=True)
        return None
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def strongest(table: pd.DataFrame, top: int = 5) -> pd.DataFrame:
    """The summary's rows: per configuration, the ``top`` correlations and the ``top`` R² of every image (group
    ``all``), each with the most significant replicates first, then the largest |mean|."""
    if not len(table):
        return table
    rows = table[table["kind"].isin(["correlation", "r2"]) & table["group"].eq("all") & table["mean"].notna()]
    rows = rows.assign(_abs=rows["mean"].abs()).sort_values(["n_significant", "_abs"], ascending=False,
                                                           kind="stable")
    rows = rows.groupby(["configuration", "kind"], sort=False).head(top)
    order = {name: k for k, name in enumerate(dict.fromkeys(table["configuration"]))}
    rows = rows.assign(_c=rows["configuration"].map(order), _k=rows["kind"].ne("correlation"))
    return rows.sort_values(["_c", "_k"], kind="stable").drop(columns=["_abs", "_c", "_k"]).reset_index(drop=True)
