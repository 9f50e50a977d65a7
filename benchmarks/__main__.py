"""Every benchmark in one command, each figure beside its baseline measured in the same run.

    python -m benchmarks [--size full|quick|smoke] [--only SUITE ...] [--out DIR]

Suites: ``run`` (end-to-end ``fluency run`` against the forward pass alone), ``metrics`` (``gini``
against the per-image ``gini.py`` approach, batched SAM against the per-image loop), ``store``
(writing and reading the activation store against ``np.save``/``np.load``), ``analysis`` (ridge,
ΔR², bootstrap CIs), ``memory`` (peak RSS of ``fluency run`` at two sizes), ``training`` (``fluency
train`` against a bare PyTorch loop over the same PNG folder, images/s). ``full`` uses the sizes
of ``docs/benchmarks.md`` (about an hour on 2 cores, most of it the 100,000-image memory run),
``quick`` smaller ones (minutes), ``smoke`` tiny ones that only check that every suite runs.

Writes ``DIR/results.md`` and ``DIR/results.json`` (default DIR: ``benchmark-results``) and prints
the Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: per suite and size, the arguments of its ``measure``
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "run": {"full": {"images": 10000, "repeats": 3}, "quick": {"images": 2000, "repeats": 2},
            "smoke": {"images": 64, "repeats": 1}},
    "metrics": {"full": {"images": 256, "sam_images": 32}, "quick": {"images": 128, "sam_images": 16},
                "smoke": {"images": 8, "sam_images": 4}},
    "store": {"full": {}, "quick": {"quick": True}, "smoke": {"smoke": True}},
    "analysis": {"full": {"permutations": 1000}, "quick": {"permutations": 200},
                 "smoke": {"images": 60, "layers": 3, "permutations": 10}},
    "memory": {"full": {"sizes": (10000, 100000)}, "quick": {"sizes": (1000, 10000)},
               "smoke": {"sizes": (40, 80)}},
    "training": {"full": {"images": 2000, "epochs": 2, "repeats": 3}, "quick": {"images": 500, "epochs": 1,
                                                                              "repeats": 2},
                 "smoke": {"images": 24, "size": 32, "batch": 8, "epochs": 1, "repeats": 1}},
}


def figure(suite: str, name: str, value: float, unit: str, baseline: str = "", baseline_value: float = float("nan"),
           ratio: float = float("nan"), target: str = "") -> dict[str, Any]:
    """One row of the results: a measured figure, its baseline from the same run and their ratio."""
    return {"suite": suite, "figure": name, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "target": target}


def run_suite(size: dict[str, Any]) -> list[dict[str, Any]]:
    import bench_run

    m = bench_run.measure(**size)
    per_s, label = m["images_per_s"], f"{m['model']}, {m['images']} images"
    rows = [figure("run", f"forward, encoder ({label})", per_s["forward, encoder"], "images/s")]
    for name, target in (("run, measuring", ""), ("run, end to end", "≥ 0.5× (vae-small)")):
        rows.append(figure("run", name, per_s[name], "images/s", "forward, encoder", per_s["forward, encoder"],
                           per_s[name] / per_s["forward, encoder"], target))
        rows.append(figure("run", name, per_s[name], "images/s", "forward, whole model",
                           per_s["forward, whole model"], per_s[name] / per_s["forward, whole model"]))
    return rows


def metrics_suite(size: dict[str, Any]) -> list[dict[str, Any]]:
    import bench_metrics

    g = bench_metrics.bench_gini(n_images=size["images"])
    s = bench_metrics.bench_sam(n=size["sam_images"])
    return [figure("metrics", "gini", g["fluency_images_per_s"], "images/s", "per-image gini.py approach",
                   g["gini_py_images_per_s"], g["fluency_images_per_s"] / g["gini_py_images_per_s"], "≥ 2×"),
            figure("metrics", "sam, batched", s["vmap_images_per_s"], "images/s", "sam, per-image loop",
                   s["loop_images_per_s"], s["vmap_images_per_s"] / s["loop_images_per_s"])]


def store_suite(size: dict[str, Any]) -> list[dict[str, Any]]:
    import bench_store

    return [figure("store", **row) for row in bench_store.figures(**size)]


def analysis_suite(size: dict[str, Any]) -> list[dict[str, Any]]:
    import bench_analysis

    m = bench_analysis.measure(**size)
    s, label = m["seconds"], f"{m['images']} images × {m['layers']} layers, {m['permutations']} permutations"
    baseline = "ΔR² null one pipeline per shuffle (scaled)"
    return [figure("analysis", f"ridge ({label})", s["ridge"], "s", target="< 10 s"),
            figure("analysis", "ridge + ΔR² over 5 covariates", s["ridge + ΔR² over 5 covariates"], "s",
                   "ridge + ΔR², ΔR² null fitted per shuffle",
                   s["ridge"] + s[baseline], (s["ridge"] + s[baseline]) / s["ridge + ΔR² over 5 covariates"],
                   "< 20 s"),
            figure("analysis", "pearson + spearman, bootstrap CIs", s["pearson + spearman, bootstrap CIs"], "s")]


def memory_suite(size: dict[str, Any]) -> list[dict[str, Any]]:
    import bench_memory

    m = bench_memory.measure(**size)
    small, large = m["runs"]
    return [figure("memory", f"peak RSS, {large['images']} images", large["peak_rss_mib"], "MiB",
                   f"peak RSS, {small['images']} images", small["peak_rss_mib"], m["growth"], "< 1.10×"),
            figure("memory", f"report, {large['images']} images", large["timings"].get("report", float("nan")),
                   "s", target="< 30 s at 10,000 images")]


def training_suite(size: dict[str, Any]) -> list[dict[str, Any]]:
    import bench_training

    m = bench_training.against_bare(**size)
    per_s, base = m["images_per_s"], "bare PyTorch loop"
    label = (f"{m['architecture']} {m['image_size']}², {m['train_images']} training images × {m['epochs']} epochs, "
             f"batch {m['batch_size']}, {m['optimizer']}, {m['workers']} workers")
    return [figure("training", f"bare PyTorch loop ({label})", per_s["bare"], "images/s"),
            figure("training", "fluency train, training phase", per_s["train phase"], "images/s", base, per_s["bare"],
                   per_s["train phase"] / per_s["bare"], "≥ 0.9×"),
            figure("training", "fluency train, whole epochs (validation, health records, last.pt)",
                   per_s["whole epochs"], "images/s", base, per_s["bare"], per_s["whole epochs"] / per_s["bare"])]


SUITES: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "run": run_suite, "metrics": metrics_suite, "store": store_suite, "analysis": analysis_suite,
    "memory": memory_suite, "training": training_suite}


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    def number(value: float) -> str:
        return "" if value != value else f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"

    lines = [f"Measured {info['date']} on {info['machine']} ({info['threads']} torch threads, torch {info['torch']}, "
             f"numpy {info['numpy']}), `python -m benchmarks --size {info['size']}`.", "",
             "| suite | figure | value | baseline (same run) | ratio | target |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = f"{r['baseline']}: {number(r['baseline_value'])} {r['unit']}" if r["baseline"] else ""
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] == r["ratio"] else ""
        lines.append(f"| {r['suite']} | {r['figure']} | {number(r['value'])} {r['unit']} | {base} | {ratio} | "
                     f"{r['target']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "quick", "smoke"], default="full")
    parser.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES))
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))  # the bench_*.py scripts beside this file
    info = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {_cores()} cores",
            "threads": torch.get_num_threads(), "torch": str(torch.__version__), "numpy": np.__version__,
            "size": args.size}
    rows: list[dict[str, Any]] = []
    for name in args.only:
        print(f"benchmarks: {name} …", file=sys.stderr, flush=True)
        rows += SUITES[name](SIZES[name][args.size])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"info": info, "figures": rows}, indent=1), encoding="utf-8")
    table = markdown(rows, info)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    print(table)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
