"""Batch evaluation: the Dask executor against the local one, as ratios measured in the same run.

    python benchmarks/bench_batch.py [--repeats 3] [--images N] [--device auto] [--json]

Four checkpoints (the shipped model with seeded weight noise) measure gini and lepsilon on the
embedded stimuli (240 images at 64×64; ``--images N``: N generated images written as PNG files, decoded
as a user's would be), no store, no figures, no report, no analyses:

- local: the in-process executor with torch's default threads (today's behaviour);
- dask 2×1: a 2-process LocalCluster, one torch thread per worker, one task per checkpoint
  (cluster start-up included: it is part of what a user waits for);
- one checkpoint, local vs dask with one worker of the local thread count: Dask's overhead where it
  cannot gain;
- on a GPU machine (``--device cuda``): dask with its default workers, one per GPU, each seeing only
  its own GPU (``CUDA_VISIBLE_DEVICES``).

Each configuration runs ``--repeats`` times in alternation; the medians and their ratios are printed
(local ÷ dask: above 1 means Dask is faster). The script needs the ``dask`` extra and a ``__main__``
guard (a LocalCluster of processes re-imports the main module).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fluency
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
from fluency.core.plugin.manager import PluginManager


def checkpoints(folder: Path, n: int) -> list[Path]:
    """``n`` distinct checkpoints: the shipped model with seeded weight noise."""
    paths = []
    for seed in range(n):
        loaded = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False))
        info = {k: v for k, v in loaded.info.items() if k not in ("format", "format_version", "architecture")}
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(0.2 * p.std().nan_to_num() * torch.randn_like(p))
        path = folder / f"m{seed}" / "final.pt"
        path.parent.mkdir(parents=True)
        save_checkpoint(path, loaded.model, "vae-small", **info, note=f"benchmark copy {seed}")
        paths.append(path)
    return paths


def timed(folder: Path, name: str, **settings: object) -> float:
    """Seconds of one ``fluency.run`` into a new folder."""
    out = folder / f"{name}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    fluency.run(metrics=["gini", "lepsilon"], out=out, progress=False, figures=False, report=False, store=False,
                covariates=False, analyses=[], **settings)
    return time.perf_counter() - t0


def measure(repeats: int, images: int, device: str) -> dict[str, float]:
    from fluency.core.inputs import demo

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        four = checkpoints(folder / "models", 4)
        stimuli: dict[str, object] = {"device": device}
        if images:
            exported = demo.export(folder / "stimuli", n=images, size=64, seed=0)
            stimuli.update(images=exported / "images", ratings=exported / "ratings.csv")
        runs = {
            "4 checkpoints, local": dict(checkpoints=four),
            "4 checkpoints, dask 2×1": dict(checkpoints=four, executor="dask", workers=2, threads=1),
            "1 checkpoint, local": dict(checkpoints=four[:1]),
            f"1 checkpoint, dask 1×{threads}": dict(checkpoints=four[:1], executor="dask", workers=1,
                                                    threads=threads),
        }
        if device != "cpu" and torch.cuda.is_available():
            runs["4 checkpoints, dask 1 per GPU"] = dict(checkpoints=four, executor="dask", threads=threads)
        runs = {label: {**settings, **stimuli} for label, settings in runs.items()}
        timed(folder, "warm-up", checkpoints=four[:1], **stimuli)
        times: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(repeats):
            for label, settings in runs.items():
                times[label].append(timed(folder, label.replace(" ", "_"), **settings))
    medians = {label: statistics.median(values) for label, values in times.items()}
    medians["threads"] = threads
    return medians


def table(m: dict[str, float]) -> str:
    threads = int(m["threads"])
    dask_one = f"1 checkpoint, dask 1×{threads}"
    lines = [f"{'configuration':<32}{'median s':>10}"]
    lines += [f"{label:<32}{seconds:>10.2f}" for label, seconds in m.items() if label != "threads"]
    lines.append(f"{'local ÷ dask 2×1 (4 checkpoints)':<32}{m['4 checkpoints, local'] / m['4 checkpoints, dask 2×1']:>10.2f}")
    lines.append(f"{'dask overhead (1 checkpoint)':<32}{m[dask_one] / m['1 checkpoint, local'] - 1:>10.1%}")
    if "4 checkpoints, dask 1 per GPU" in m:
        ratio = m["4 checkpoints, local"] / m["4 checkpoints, dask 1 per GPU"]
        lines.append(f"{'local ÷ dask 1 per GPU':<32}{ratio:>10.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=0, help="generated PNG images (0: the embedded 240)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    m = measure(args.repeats, args.images, args.device)
    print(f"{platform.node()}: {torch.get_num_threads()} torch threads, python {platform.python_version()}")
    print(table(m))
    if args.json:
        print(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
