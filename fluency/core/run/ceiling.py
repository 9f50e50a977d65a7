"""The noise ceiling of a run: the reliability of its mean rating, from ``--rater-ratings``.

``fluency run --ratings means.csv --rater-ratings raw.csv`` reads the per-rater table up front (its errors come
before any work; :mod:`fluency.core.inputs.raters`), and after the analyses estimates the reliability of the
mean rating on the analysed images (:mod:`fluency.core.noise_ceiling`), for all of them and for every analysed
``--by`` subgroup (a subgroup's ceiling is lower when its images differ less). It writes
``reliability.parquet`` (one row per group) and returns the manifest's ``reliability`` entry.

The per-image rating analysed is still the ``--ratings`` column; the manifest records its correlation with the
mean of the per-rater table (``r_mean_vs_ratings``), which should be 1 when one was averaged from the other.

:func:`with_ceiling` adds ``of_ceiling`` (r² or R² over the ceiling of the row's group) to analysis rows, for
the terminal summary, ``--json`` and the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fluency.core.atomic import atomic_path
from fluency.core.inputs.raters import RaterRatings, read_rater_ratings
from fluency.core.inputs.stimuli import Stimuli
from fluency.core.plugin.analysis import EffectSize
from fluency.core.noise_ceiling import ceiling_fraction, reliability
from fluency.core.run.analyse import subgroups
from fluency.core.run.config import RunConfig

TABLE = "reliability.parquet"


def load_raters(config: RunConfig, stimuli: Stimuli) -> RaterRatings | None:
    """The ``--rater-ratings`` table for the analysed images (None without one)."""
    if config.rater_ratings is None or stimuli.ratings is None:  # RunConfig.check: no rater table without ratings
        return None
    return read_rater_ratings(config.rater_ratings, list(stimuli.ratings["image_id"]), config.id_column,
                              config.rater_column, config.rating_column)


def noise_ceiling(raters: RaterRatings, stimuli: Stimuli, config: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Estimate the reliability for all analysed images and each analysed subgroup; write :data:`TABLE`;
    return the manifest entry (``ceiling``: the whole set's)."""
    ratings = stimuli.ratings
    assert ratings is not None
    groups, _ = (subgroups(ratings, config.by, config.min_group_size) if config.by
                 else ([("all", ratings)], []))
    found: dict[str, dict[str, Any]] = {}
    for label, rows in groups:
        matrix = raters.subset(list(rows["image_id"]))
        try:
            found[label] = {"group": label, **reliability(matrix, config.reliability_splits,
                                                          seed=config.seed).as_dict()}
        except ValueError as exc:  # too few raters or images in this group
            found[label] = {"group": label, "ceiling": None, "note": str(exc)}
    with atomic_path(out_dir / TABLE) as tmp:
        pd.DataFrame(list(found.values())).to_parquet(tmp, index=False)
    means = raters.mean_ratings()
    joined = ratings.set_index("image_id")[stimuli.rating_column].reindex(means.index)
    ok = joined.notna().to_numpy() & means.notna().to_numpy()
    r = float(np.corrcoef(means[ok], joined[ok])[0, 1]) if ok.sum() >= 3 else math.nan
    return {"rater_ratings": raters.describe(), "ceiling": found["all"]["ceiling"],
            "r_mean_vs_ratings": r if math.isfinite(r) else None, "table": TABLE, "groups": found}


def ceilings(manifest: Mapping[str, Any]) -> dict[str, float]:
    """``{group: ceiling}`` as the run recorded it (empty without ``--rater-ratings``)."""
    groups = (manifest.get("reliability") or {}).get("groups") or {}
    return {str(g): float(v["ceiling"]) for g, v in groups.items()
            if isinstance(v, Mapping) and isinstance(v.get("ceiling"), (int, float))}


def with_ceiling(rows: pd.DataFrame, effects: Mapping[tuple[str, str], EffectSize],
                 manifest: Mapping[str, Any]) -> pd.DataFrame:
    """``rows`` (analysis results) with ``of_ceiling``: r² (correlations) or R² (kind ``r2``) over the noise
    ceiling of the row's group; NaN for other kinds. Unchanged when the run has no ceiling."""
    found = ceilings(manifest)
    if not found or not len(rows):
        return rows
    groups = rows["group"].fillna("all") if "group" in rows.columns else pd.Series("all", index=rows.index)
    values = [ceiling_fraction(estimate, getattr(effects.get((a, str(s))), "kind", None), found.get(g))
              for a, s, estimate, g in zip(rows["analysis"], rows["statistic"], rows["estimate"], groups)]
    return rows.assign(of_ceiling=values)
