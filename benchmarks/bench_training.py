"""Training throughput on this machine: images/s per architecture, and SAM's cost relative to Adam.

Measured in one process, same data, same steps, so the ratios are comparable:

    python benchmarks/bench_training.py                 # vae-small @64 and vae-vgg16 @128, Adam and SAM
    python benchmarks/bench_training.py --steps 20 --batch-size 16

Each configuration runs ``--warmup`` untimed steps, then ``--steps`` timed optimizer steps
(forward + backward + update, closure-stepped exactly as ``fluency train`` does); the best of
``--repeats`` timings is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fluency.core.model.losses import loss_from_config
from fluency.core.plugin.manager import PluginManager


def images_per_second(pm: PluginManager, arch: str, size: int, optimizer: str, batch: int, steps: int,
                      warmup: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = pm.get("architecture", arch).load()(image_size=size)
    model.train()
    factory = pm.get("optimizer", optimizer).load()
    spec_opts = pm.get("optimizer", optimizer).resolve(pm.option_defaults("optimizer", optimizer))
    kwargs = {"model": model} if optimizer == "sam" else {}
    opt = factory(model.parameters(), **spec_opts, **kwargs)
    x = torch.rand(batch, 3, size, size)
    vae_loss = loss_from_config(model, {})  # fluency train's default: l2 summed over pixels + 1·KL, per image

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = vae_loss(model(x), x).mean()
        loss.backward()
        return loss

    for _ in range(warmup):
        opt.step(closure)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step(closure)
        best = min(best, time.perf_counter() - t0)
    return steps * batch / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--configs", default="vae-small:64,vae-vgg16:128")
    args = ap.parse_args()
    pm = PluginManager(autoload=False)
    rows = []
    for item in args.configs.split(","):
        arch, size = item.split(":")
        adam = images_per_second(pm, arch, int(size), "adam", args.batch_size, args.steps, args.warmup, args.repeats)
        sam = images_per_second(pm, arch, int(size), "sam", args.batch_size, args.steps, args.warmup, args.repeats)
        rows.append({"architecture": arch, "image_size": int(size), "adam_images_per_s": round(adam, 1),
                     "sam_images_per_s": round(sam, 1), "sam_cost_vs_adam": round(adam / sam, 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "torch": str(torch.__version__), "batch_size": args.batch_size, "steps": args.steps}))


if __name__ == "__main__":
    main()
