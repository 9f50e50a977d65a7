"""``fluency train``: fit an Architecture plugin's VAE to a folder of images.

The loss per image is the reconstruction error (MSE or L1, summed over pixels)
plus beta × KL; the optimizer is an Optimizer plugin stepped with a closure. The
result is one checkpoint file (see :mod:`fluency.core.checkpoint`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fluency import __version__
from fluency.core.checkpoint import save_checkpoint
from fluency.core.config import read_config, resolve_plugin_options
from fluency.core.devices import resolve_device
from fluency.core.errors import FluencyError, TrainingError
from fluency.core.images import FolderSource, Preprocessing, find_images
from fluency.core.losses import RECONSTRUCTION, vae_loss_terms
from fluency.core.plugins import PluginManager, get_plugin_manager
from fluency.core.progress import progress_bar


@dataclass
class TrainResult:
    """Where the checkpoint went and how the loss evolved."""

    checkpoint: Path
    history: list[dict[str, float]]
    seconds: float


class _SourceDataset(torch.utils.data.Dataset):
    def __init__(self, source: FolderSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.source.load(index)


def train(
    images: str | Path,
    out: str | Path,
    architecture: str = "vae-small",
    optimizer: str = "adam",
    epochs: int = 10,
    batch_size: int = 32,
    image_size: int = 64,
    reconstruction: str = "mse",
    beta: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    options: Sequence[str] = (),
    config: str | Path | None = None,
    manager: PluginManager | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train and write ``out/final.pt``; ``options`` are ``-o PLUGIN.KEY=VALUE`` strings."""
    start = time.perf_counter()
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True)
    if reconstruction not in RECONSTRUCTION:
        raise FluencyError(f"--loss {reconstruction!r}: use one of {list(RECONSTRUCTION)}")
    used = [("architecture", architecture), ("optimizer", optimizer)]
    resolved = resolve_plugin_options(manager, used, options, read_config(config))
    arch_options = {**resolved[("architecture", architecture)], "image_size": image_size}
    torch.manual_seed(seed)
    model = manager.get("architecture", architecture).load()(**arch_options)
    dev = resolve_device(device)
    model.to(dev).train()
    opt_options = resolved[("optimizer", optimizer)]
    opt = manager.get("optimizer", optimizer).load()(model.parameters(), **opt_options)

    root = Path(images)
    files = find_images(root)
    source = FolderSource(root, {p.relative_to(root).with_suffix("").as_posix(): p for p in files},
                          Preprocessing(image_size, model.input_shape[0]))
    loader = torch.utils.data.DataLoader(_SourceDataset(source), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "loss": {"reconstruction": reconstruction, "beta": beta},
        "optimizer": {"name": optimizer, "options": opt_options},
        "provenance": {"fluency_version": __version__, "torch_version": torch.__version__,
                       "images": str(root), "n_images": len(source), "stimulus_fingerprint": source.fingerprint(),
                       "preprocessing": source.preprocessing.as_dict(), "seed": seed,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }
    history: list[dict[str, float]] = []
    with progress_bar(console) as progress:
        task = progress.add_task("training", total=epochs * len(loader), status="")
        for epoch in range(1, epochs + 1):
            totals = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
            for batch in loader:
                batch = batch.to(dev)
                terms: dict[str, torch.Tensor] = {}

                def closure() -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    terms.update(vae_loss_terms(model(batch), batch, reconstruction, beta))
                    loss = terms["loss"].mean()
                    loss.backward()
                    return loss

                loss = opt.step(closure)
                if not math.isfinite(float(loss.detach())):
                    last = out / "final.pt"
                    kept = f"; the last good checkpoint is {last}" if last.exists() else ""
                    raise TrainingError(f"epoch {epoch}: the loss became {float(loss.detach())} (NaN/Inf); training "
                                        f"stopped{kept}. Lower the learning rate (-o {optimizer}.lr=...) or beta.")
                for key in totals:
                    totals[key] += float(terms[key].detach().sum())
                progress.update(task, advance=1, status=f"epoch {epoch}/{epochs} loss {float(loss.detach()):.1f}")
            history.append({"epoch": epoch, **{k: v / len(source) for k, v in totals.items()}})
            save_checkpoint(out / "final.pt", model.cpu(), architecture, epoch=epoch, history=history, **info)
            model.to(dev)
    return TrainResult(out / "final.pt", history, time.perf_counter() - start)
