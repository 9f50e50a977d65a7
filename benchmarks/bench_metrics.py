"""Metric speed on this machine, as ratios against baselines measured in the same run.

    python benchmarks/bench_metrics.py

1. ``gini`` over a realistic layer (65,536 units per image, ReLU-like float32 activations):
   fluency's implementation vs the widely copied per-image ``gini.py`` approach (shift, +1e-7,
   sort, weighted sum — re-implemented here from its formula) and vs the read-once memory bound
   (the time to sum the same data once).
2. The overhead of ``gini`` + ``lepsilon`` (with the activation capture they need) on top of the
   forward pass alone, for ``vae-small`` on the embedded default (240 images, batches of 32).
3. ``sam`` sharpness: the batched ``torch.func`` path vs the per-image loop.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from fluency.core.inputs import demo
from fluency.core.model.capture import capture_activations
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from fluency.core.model.losses import loss_from_config
from fluency.core.plugin.metric import MetricBatch
from fluency.core.plugin.manager import PluginManager
from fluency.plugins.default_gini import Gini, gini
from fluency.plugins.default_lepsilon import LEpsilon
from fluency.plugins.default_sam import SAMSharpness


def best(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gini_py_style(batch: np.ndarray) -> np.ndarray:
    """The per-image approach of the common gini.py: one vector at a time, shift + 1e-7, sort."""
    out = np.empty(len(batch))
    for i, row in enumerate(batch):
        v = row.astype(np.float64)
        if v.min() < 0:
            v = v - v.min()
        v = np.sort(v + 1e-7)
        n = v.shape[0]
        k = np.arange(1, n + 1)
        out[i] = np.sum((2 * k - n - 1) * v) / (n * np.sum(v))
    return out


def bench_gini(n_images: int = 256, units: int = 65536) -> dict[str, float]:
    """fluency's ``gini`` (one thread, and the default of ``torch.get_num_threads()``) vs the per-image
    ``gini.py`` approach and the read-once bound, on ReLU-like float32 rows (about half zeros)."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(n_images, units)), 0).astype(np.float32)
    threads = torch.get_num_threads()
    t_one = best(lambda: gini(x, threads=1), 5)
    t_ours = best(lambda: gini(x), 5)
    t_ref = best(lambda: gini_py_style(x), 5)
    t_bound = best(lambda: x.sum(axis=1), 5)
    return {"images": n_images, "units": units, "threads": threads,
            "gini_py_images_per_s": round(n_images / t_ref),
            "fluency_1_thread_images_per_s": round(n_images / t_one),
            "fluency_images_per_s": round(n_images / t_ours),
            "speedup_1_thread_vs_gini_py": round(t_ref / t_one, 2),
            "speedup_vs_gini_py": round(t_ref / t_ours, 2),
            "read_once_images_per_s": round(n_images / t_bound), "fraction_of_read_bound": round(t_bound / t_ours, 3)}


def bench_overhead(repeats: int = 7) -> dict[str, float]:
    """Forward pass alone vs forward with activation capture + ``gini`` + ``lepsilon``, batch by batch.

    The two are interleaved within each batch and the best of ``repeats`` passes is kept, so that
    background load on a small machine hits both alike.
    """
    model = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False)).model.eval()
    images, _ = demo.generate()
    x = demo.as_tensor(images)
    layers = list(model.default_metric_layers)
    gini_metric = Gini(layers=layers, all_layers=True)
    lepsilon_metric = LEpsilon(epsilon=0.01, mode="absolute", layers=layers)
    totals: dict[str, list[float]] = {"forward": [], "forward_with_capture": [], "gini": [], "lepsilon": []}
    for _ in range(repeats):
        run = dict.fromkeys(totals, 0.0)
        for i in range(0, len(x), 32):
            xb = x[i:i + 32]
            t0 = time.perf_counter()
            with torch.no_grad():
                model(xb, sample=False)
            t1 = time.perf_counter()
            with torch.no_grad(), capture_activations(model, layers) as acts:
                model(xb, sample=False)
            t2 = time.perf_counter()
            batch = MetricBatch([str(k) for k in range(i, i + len(xb))], xb, acts)
            gini_metric.compute(batch)
            t3 = time.perf_counter()
            lepsilon_metric.compute(batch)
            t4 = time.perf_counter()
            for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                run[key] += dt
        for key in totals:
            totals[key].append(run[key])
    best_of = {key: min(values) for key, values in totals.items()}
    with_metrics = best_of["forward_with_capture"] + best_of["gini"] + best_of["lepsilon"]
    return {"images": len(x), **{f"{k}_s": round(v, 4) for k, v in best_of.items()},
            "overhead": round(with_metrics / best_of["forward"] - 1, 3)}


def bench_sam(n: int = 32) -> dict[str, float]:
    ck = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False))
    model = ck.model.eval()
    x = demo.as_tensor(demo.generate(n)[0])
    batch = MetricBatch([str(i) for i in range(n)], x, model=model, loss=loss_from_config(model, ck.info["loss"], ck.label))
    t_loop = best(lambda: SAMSharpness(rho=0.05, method="loop").compute(batch), 2)
    t_vmap = best(lambda: SAMSharpness(rho=0.05, method="vmap", chunk_size=16).compute(batch), 2)
    return {"images": n, "loop_images_per_s": round(n / t_loop, 1), "vmap_images_per_s": round(n / t_vmap, 1),
            "vmap_speedup": round(t_loop / t_vmap, 2)}


def main() -> None:
    info = {"machine": platform.processor() or platform.machine(), "torch": str(torch.__version__),
            "numpy": np.__version__, "threads": torch.get_num_threads()}
    print(json.dumps({"gini": bench_gini()}), flush=True)
    print(json.dumps({"overhead": bench_overhead()}), flush=True)
    print(json.dumps({"sam": bench_sam()}), flush=True)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
