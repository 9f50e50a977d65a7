"""Training throughput on this machine: images/s per architecture, SAM's cost relative to Adam, and
``fluency train`` against a bare PyTorch loop over the same PNG folder (issue 16).

Measured in one process, same data, same steps, so the ratios are comparable:

    python benchmarks/bench_training.py                 # vae-small @64 and vae-vgg16 @128, Adam and SAM
    python benchmarks/bench_training.py --steps 20 --batch-size 16
    python benchmarks/bench_training.py --against-bare --images 2000 --epochs 2 --repeats 3 [--workers auto]

Each configuration runs ``--warmup`` untimed steps, then ``--steps`` timed optimizer steps
(forward + backward + update, closure-stepped exactly as ``fluency train`` does); the best of
``--repeats`` timings is reported.

``--against-bare`` writes ``--images`` generated PNG files (``fluency demo export``) and times, in
alternation, ``--repeats`` times each and keeping the best:

- bare: a plain PyTorch loop over the training images of ``fluency train``'s split: a ``DataLoader``
  (PIL decode + to-tensor, shuffled, the same ``--workers``, persistent), the same model, batch size,
  optimizer (default options) and loss (l2 summed over pixels + KL, batch mean), ``zero_grad``,
  ``backward``, ``step``;
- ``fluency train`` on the same folder and epochs (no figures): its training phase (the epochs' passes
  over the training images, timed around each) and its whole epochs (with validation, the checkpoint's
  health records, ``last.pt`` and ``history.parquet``; the ``seconds`` of its history).

Both are images/s over the training images (``epochs × n_train``); the ratio is fluency over bare.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from fluency.core.errors import FluencyError
from fluency.core.inputs import demo
from fluency.core.model.losses import loss_from_config
from fluency.core.plugin.manager import PluginManager
from fluency.core.train import training
from fluency.core.train.loading import worker_count


def images_per_second(pm: PluginManager, arch: str, size: int, optimizer: str, batch: int, steps: int,
                      warmup: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = pm.get("architecture", arch).load()(image_size=size)
    model.train()
    opt = _optimizer(pm, optimizer, model)
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


class PNGFolder(torch.utils.data.Dataset):
    """The bare loop's images: PIL decode, RGB, to a float tensor in [0, 1] (what torchvision's ToTensor does)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1)


def _optimizer(pm: PluginManager, name: str, model: torch.nn.Module) -> Any:
    """The optimizer plugin ``name`` with its default options over ``model``'s parameters."""
    factory = pm.get("optimizer", name).load()
    options = pm.get("optimizer", name).resolve(pm.option_defaults("optimizer", name))
    return factory(model.parameters(), **options, **({"model": model} if name == "sam" else {}))


def bare_seconds(pm: PluginManager, paths: list[Path], arch: str, size: int, optimizer: str, batch: int,
                 workers: int, epochs: int) -> float:
    """Seconds of a plain PyTorch training loop over ``paths`` for ``epochs`` (model built untimed)."""
    torch.manual_seed(0)
    model = pm.get("architecture", arch).load()(image_size=size)
    model.train()
    opt, vae_loss = _optimizer(pm, optimizer, model), loss_from_config(model, {})
    loader = torch.utils.data.DataLoader(PNGFolder(paths), batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x in loader:
            def closure(x: torch.Tensor = x) -> torch.Tensor:  # SAM needs one; Adam takes it as well
                opt.zero_grad(set_to_none=True)
                loss = vae_loss(model(x), x).mean()
                loss.backward()
                return loss

            if optimizer == "sam":
                opt.step(closure)
            else:
                closure()
                opt.step()
    return time.perf_counter() - t0


def fluency_seconds(pm: PluginManager, images: Path, out: Path, arch: str, size: int, optimizer: str, batch: int,
                    workers: int, epochs: int) -> tuple[float, float, int]:
    """``fluency train``'s training-phase and whole-epoch seconds over ``epochs``, and its training images."""
    phases: list[float] = []
    train_epoch = training._train_epoch

    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            return train_epoch(*args, **kwargs)
        finally:
            phases.append(time.perf_counter() - t0)

    cfg = training.TrainConfig(images=str(images), out=str(out), architecture=arch, optimizer=optimizer,
                               epochs=epochs, batch_size=batch, image_size=size, workers=workers, figures=False)
    training._train_epoch = timed
    try:
        result = training.train(cfg, manager=pm, console=Console(quiet=True), overwrite=True)
    finally:
        training._train_epoch = train_epoch
    n_train = len(training.split_indices(len(list(images.glob("*.png"))), cfg.val_fraction, cfg.seed)[0])
    return sum(phases), sum(h["seconds"] for h in result.history), n_train


def against_bare(images: int = 2000, size: int = 64, arch: str = "vae-small", optimizer: str = "adam",
                 batch: int = 32, workers: int | str = "auto", epochs: int = 2, repeats: int = 3,
                 folder: Path | None = None) -> dict[str, Any]:
    """Best-of-``repeats`` images/s of the bare loop and of ``fluency train`` (training phase, whole epochs),
    alternating, on ``images`` generated PNG files of ``size``² (written under ``folder`` or a temporary one)."""
    pm = PluginManager(autoload=False)
    n_workers = worker_count(workers, "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        root = Path(folder or tmp)
        stimuli = root / "images"
        if not stimuli.is_dir() or len(list(stimuli.glob("*.png"))) != images:
            try:  # never replaces a file: a --folder holding anything else is refused
                demo.export(root, n=images, size=size, seed=1)
            except FluencyError:
                raise SystemExit(f"--folder {root} holds files other than the {images} images this benchmark "
                                 "generates there; choose an empty or new folder (nothing in it is replaced)") from None
        paths = sorted(stimuli.glob("*.png"))
        train_idx, _ = training.split_indices(len(paths), 0.1, 0)
        best = {"bare": float("inf"), "train phase": float("inf"), "whole epochs": float("inf")}
        for k in range(repeats):
            best["bare"] = min(best["bare"], bare_seconds(pm, [paths[i] for i in train_idx], arch, size, optimizer,
                                                          batch, n_workers, epochs))
            phase, whole, n_train = fluency_seconds(pm, stimuli, Path(tmp) / f"out-{k}", arch, size, optimizer,
                                                    batch, n_workers, epochs)
            best["train phase"], best["whole epochs"] = min(best["train phase"], phase), min(best["whole epochs"], whole)
    assert n_train == len(train_idx)
    per_s = {name: epochs * n_train / seconds for name, seconds in best.items()}
    return {"architecture": arch, "image_size": size, "optimizer": optimizer, "batch_size": batch, "images": images,
            "train_images": n_train, "epochs": epochs, "workers": n_workers, "repeats": repeats,
            "threads": torch.get_num_threads(), "images_per_s": {k: round(v, 1) for k, v in per_s.items()},
            "ratio": {"train phase": round(per_s["train phase"] / per_s["bare"], 3),
                      "whole epochs": round(per_s["whole epochs"] / per_s["bare"], 3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, help="default 16; with --against-bare 32 (fluency train's)")
    ap.add_argument("--configs", default="vae-small:64,vae-vgg16:128")
    ap.add_argument("--against-bare", action="store_true", help="fluency train against a bare PyTorch loop")
    ap.add_argument("--images", type=int, default=2000, help="with --against-bare: generated PNG files")
    ap.add_argument("--image-size", type=int, default=64, help="with --against-bare")
    ap.add_argument("--arch", default="vae-small", help="with --against-bare")
    ap.add_argument("--optimizer", default="adam", help="with --against-bare")
    ap.add_argument("--epochs", type=int, default=2, help="with --against-bare")
    ap.add_argument("--workers", default="auto", help="with --against-bare: decoding processes of both loops")
    ap.add_argument("--folder", type=Path, help="with --against-bare: a new or empty folder to keep (and reuse) the PNG files in")
    args = ap.parse_args()
    if args.against_bare:
        result = against_bare(args.images, args.image_size, args.arch, args.optimizer, args.batch_size or 32,
                              args.workers, args.epochs, args.repeats, args.folder)
        print(json.dumps({**result, "machine": platform.processor() or platform.machine(),
                          "torch": str(torch.__version__)}))
        return
    pm, rows, args.batch_size = PluginManager(autoload=False), [], args.batch_size or 16
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
