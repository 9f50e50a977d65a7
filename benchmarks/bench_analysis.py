"""Analysis speed on the study's scale (issue 16, point 5): 800 rated images, one metric on 20 layers.

    python benchmarks/bench_analysis.py [--images 800] [--layers 20] [--permutations 1000] [--json]

- ``ridge``: 10 × 10-fold cross-validation and 1,000 label permutations (target: under 10 s on 2 cores);
- ``ridge`` with five covariates: also the ΔR² over them and its 1,000 permutations (target: under 20 s);
  the baseline is the same ΔR² null fitted the way it was before (one scikit-learn pipeline per
  shuffle), timed on 50 shuffles and scaled to the same count;
- ``pearson`` and ``spearman``: per-layer correlations with 1,000-resample bootstrap confidence
  intervals, with the covariates.

Data are synthetic (a planted relation plus noise), so the timings do not depend on a model.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import pandas as pd

from fluency.core.plugin.analysis import AnalysisData
from fluency.plugins.default_correlation import Pearson, Spearman
from fluency.plugins.default_ridge import Ridge

COVARIATES = ("luminance", "rms-contrast", "spectral-slope", "edge-density", "jpeg-size")


def data(images: int, layers: int, seed: int = 0) -> AnalysisData:
    rng = np.random.default_rng(seed)
    ids = [f"i{k:04d}" for k in range(images)]
    values = rng.normal(size=(images, layers))
    z = rng.normal(size=(images, len(COVARIATES)))
    rating = 0.3 * values[:, 0] + 0.3 * z[:, 0] + rng.normal(size=images)
    metrics = pd.concat([pd.DataFrame({"image_id": ids, "checkpoint": "ck", "metric": "gini", "layer": f"l{j:02d}",
                                       "value": values[:, j]}) for j in range(layers)], ignore_index=True)
    covariates = pd.DataFrame({"checkpoint": "ck", "image_id": ids, **dict(zip(COVARIATES, z.T))})
    return AnalysisData(metrics, pd.DataFrame({"image_id": ids, "beauty": rating}), "beauty", covariates)


def seconds(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_shuffle_delta_null(d: AnalysisData, shuffles: int) -> float:
    """Seconds of the ΔR² null fitted one scikit-learn pipeline per shuffle (the way before 2026-12-05)."""
    from sklearn.base import clone
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold

    from fluency.plugins.default_ridge import _pipeline

    wide = d.metrics.pivot(index="image_id", columns="layer", values="value")
    x, y = wide.to_numpy(), d.ratings.set_index("image_id").loc[wide.index, "beauty"].to_numpy()
    z = d.covariate_matrix("ck", list(wide.index))
    splits = list(KFold(10, shuffle=True, random_state=0).split(z))
    model = _pipeline(np.logspace(-3, 4, 30))

    def pooled(features: np.ndarray) -> float:
        pred = np.empty_like(y)
        for train, test in splits:
            pred[test] = clone(model).fit(features[train], y[train]).predict(features[test])
        return float(r2_score(y, pred))

    rng = np.random.default_rng(1)
    return seconds(lambda: [pooled(np.column_stack([z, x[rng.permutation(len(y))]])) for _ in range(shuffles)])


def measure(images: int = 800, layers: int = 20, permutations: int = 1000) -> dict[str, Any]:
    d = data(images, layers)
    bare = AnalysisData(d.metrics, d.ratings, d.rating_column)
    ridge = {"folds": 10, "repeats": 10, "permutations": permutations, "seed": 0}
    timed = {
        "ridge": seconds(lambda: Ridge(**ridge).run(bare)),
        "ridge + ΔR² over 5 covariates": seconds(lambda: Ridge(**ridge).run(d)),
        "pearson + spearman, bootstrap CIs": seconds(lambda: (Pearson(n_boot=1000).run(d),
                                                                Spearman(n_boot=1000).run(d))),
    }
    sample = min(50, permutations)
    timed["ΔR² null one pipeline per shuffle (scaled)"] = per_shuffle_delta_null(d, sample) * permutations / sample
    return {"images": images, "layers": layers, "permutations": permutations, "seconds": timed}


def table(m: dict[str, Any]) -> str:
    lines = [f"{m['images']} images × {m['layers']} layers, {m['permutations']} permutations",
             f"{'analysis':<44}{'seconds':>9}"]
    lines += [f"{name:<44}{s:>9.2f}" for name, s in m["seconds"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    m = measure(args.images, args.layers, args.permutations)
    print(json.dumps(m, indent=1) if args.json else table(m))


if __name__ == "__main__":
    main()
