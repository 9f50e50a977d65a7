"""Figures written as PNG files (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fluency.core.atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def training_curves(history: Sequence[Mapping[str, float]], path: Path) -> None:
    """One panel per loss term (train solid, validation dashed) over epochs."""
    plt = _pyplot()
    skip = {"epoch", "beta", "lr", "seconds"}
    terms = [k for k in history[0] if k not in skip and not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, term in zip(axes[0], terms):
        ax.plot(epochs, [h.get(term, float("nan")) for h in history], label="train")
        if f"val_{term}" in history[0]:
            ax.plot(epochs, [h.get(f"val_{term}", float("nan")) for h in history], "--", label="validation")
        ax.set_title(term)
        ax.set_xlabel("epoch")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


@torch.no_grad()
def reconstruction_grid(model: Any, source: Any, indices: Sequence[int], path: Path, device: torch.device) -> None:
    """Images (top row) above their reconstructions with z = mu (bottom row)."""
    plt = _pyplot()
    was_training = model.training
    model.eval()
    images = torch.stack([source.load(i) for i in indices]).to(device)
    recon = model(images, sample=False).recon.clamp(0, 1)
    model.train(was_training)
    fig, axes = plt.subplots(2, len(indices), figsize=(1.3 * len(indices), 2.8), squeeze=False)
    for col, (a, b) in enumerate(zip(images.cpu(), recon.cpu())):
        for row, img in enumerate((a, b)):
            ax = axes[row][col]
            pixels = img.permute(1, 2, 0).numpy()
            ax.imshow(pixels[..., 0] if pixels.shape[2] == 1 else pixels, cmap="gray" if pixels.shape[2] == 1 else None,
                      vmin=0, vmax=1)
            ax.axis("off")
    axes[0][0].set_title("images", fontsize="small", loc="left")
    axes[1][0].set_title("reconstructions", fontsize="small", loc="left")
    _save(fig, path)
