"""How much the thread count moves metric values: the same run under 1, 2 and 4 torch CPU threads.

    python benchmarks/thread_effect.py                       # the embedded default: sam, grad-norm, gini
    python benchmarks/thread_effect.py --images DIR --metric sam --metric grad-norm

Prints, per metric and thread count, the largest relative difference from the one-thread values and how
many values differ at all (docs/user-guide.md, "Reproducibility"; ``fluency run --deterministic`` removes it).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

import fluency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="image folder (default: the embedded default)")
    parser.add_argument("--metric", action="append", help="metric (repeatable; default sam, grad-norm, gini)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    metrics = args.metric or ["sam", "grad-norm", "gini"]
    values = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.threads:
            torch.set_num_threads(n)
            run = fluency.run(metrics=metrics, images=args.images, analyses=[], out=f"{tmp}/t{n}", progress=False,
                              figures=False)
            values[n] = run.metrics.set_index(["image_id", "metric", "layer"])["value"].sort_index()
    base = values[args.threads[0]]
    rows = []
    for n in args.threads[1:]:
        for metric in metrics:
            a, b = base.xs(metric, level="metric"), values[n].xs(metric, level="metric")
            rel = float((np.abs(a - b) / np.abs(a).clip(lower=1e-12)).max())
            rows.append({"metric": metric, "threads": f"{args.threads[0]} vs {n}", "max_relative_difference": rel,
                         "values_differing": int((a != b).sum()), "values": len(a)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
