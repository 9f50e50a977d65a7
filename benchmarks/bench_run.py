"""End-to-end ``fluency run --metric gini --metric lepsilon`` against the forward pass alone (issue 16, point 2).

    python benchmarks/bench_run.py [--images 2000] [--model vae-vgg16 --size 224] [--repeats 3] [--json]

N generated, rated images are written as PNG files (``fluency demo export``). In the same run:

- forward, encoder: the images, already decoded into memory, through the model as far as the metrics
  read (the encoder: ``model.encode``), batches of 32, same device and threads: the baseline;
- forward, whole model: encoder and decoder (the ratio against it is reported too);
- run, measuring: ``fluency.run`` from the PNG files with the metrics only (no store, analyses,
  figures or report): decoding, capture, metrics, tables;
- run, end to end: ``fluency.run`` as a user runs it (store, analyses with the covariates, figures
  and report).

Each is timed ``--repeats`` times in alternation and the best kept. Without ``--model`` the shipped
checkpoint (``vae-small`` at 64×64) is measured; ``--model NAME --size N`` builds an untrained
architecture at N×N.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fluency
from fluency.core.inputs import demo
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, build_model, load_checkpoint
from fluency.core.plugin.manager import PluginManager

BATCH = 32
METRICS = ["gini", "lepsilon"]


def model_for(name: str | None, size: int) -> Any:
    manager = PluginManager()
    loaded = (build_model(name, {"image_size": size}, manager) if name else
              load_checkpoint(DEFAULT_CHECKPOINT, manager))
    return loaded.model.eval()


def forward_seconds(model: Any, x: torch.Tensor, encoder_only: bool) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            model.encode(x[i:i + BATCH]) if encoder_only else model(x[i:i + BATCH], sample=False)
    return time.perf_counter() - t0


def run_seconds(folder: Path, stimuli: Path, settings: dict[str, Any], name: str) -> float:
    t0 = time.perf_counter()
    fluency.run(metrics=METRICS, images=stimuli / "images", ratings=stimuli / "ratings.csv", progress=False,
                out=folder / f"{name}-{time.monotonic_ns()}", batch_size=BATCH, **settings)
    return time.perf_counter() - t0


def measure(images: int = 2000, model_name: str | None = None, size: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Best seconds of each configuration and the images per second."""
    model = model_for(model_name, size)
    models = {"models": [model_name], "options": [f"{model_name}.image_size={size}"]} if model_name else {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        stimuli = demo.export(folder / "stimuli", n=images, size=size, seed=0)
        x = demo.as_tensor(demo.generate(images, size, 0)[0])  # the same pixels, decoded already
        steps = {
            "forward, encoder": lambda: forward_seconds(model, x, True),
            "forward, whole model": lambda: forward_seconds(model, x, False),
            "run, measuring": lambda: run_seconds(folder, stimuli, {**models, "store": False, "analyses": [],
                                                                     "covariates": False, "figures": False,
                                                                     "report": False}, "measuring"),
            "run, end to end": lambda: run_seconds(folder, stimuli, models, "end-to-end"),
        }
        forward_seconds(model, x[:BATCH], True)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                times[name].append(step())
    best = {name: min(values) for name, values in times.items()}
    return {"images": images, "model": model_name or "vae-small (shipped checkpoint)", "size": size,
            "threads": torch.get_num_threads(), "seconds": best,
            "images_per_s": {name: images / seconds for name, seconds in best.items()}}


def table(m: dict[str, Any]) -> str:
    base, whole = m["seconds"]["forward, encoder"], m["seconds"]["forward, whole model"]
    lines = [f"{m['model']}, {m['images']} images at {m['size']}×{m['size']}, {m['threads']} threads",
             f"{'configuration':<24}{'best s':>9}{'images/s':>10}{'÷ encoder':>11}{'÷ whole':>9}"]
    for name, seconds in m["seconds"].items():
        lines.append(f"{name:<24}{seconds:>9.2f}{m['images_per_s'][name]:>10.0f}{base / seconds:>11.2f}"
                     f"{whole / seconds:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default=None, help="an architecture, built untrained (default: shipped model)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    m = measure(args.images, args.model, args.size, args.repeats)
    print(json.dumps(m, indent=1) if args.json else table(m))


if __name__ == "__main__":
    main()
