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


def correlation_heatmap(table: Any, path: Path, title: str, alpha: float = 0.05) -> None:
    """Metric × layer heatmap of an analysis' estimates (one panel per checkpoint); * marks p_fdr < alpha."""
    import numpy as np

    plt = _pyplot()
    table = table.assign(layer=table["layer"].fillna("(whole)"))
    checkpoints = sorted(table["checkpoint"].unique())
    fig, axes = plt.subplots(1, len(checkpoints), squeeze=False,
                             figsize=(1.0 + 0.75 * table["layer"].nunique() * len(checkpoints),
                                      1.2 + 0.38 * table["metric"].nunique()))
    for ax, ck in zip(axes[0], checkpoints):
        sub = table[table["checkpoint"] == ck]
        est = sub.pivot_table(index="metric", columns="layer", values="estimate", aggfunc="first")
        sig = sub.pivot_table(index="metric", columns="layer", values="p_fdr", aggfunc="first").reindex_like(est)
        image = ax.imshow(est.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(est.shape[1]), est.columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(est.shape[0]), est.index, fontsize=8)
        for i in range(est.shape[0]):
            for j in range(est.shape[1]):
                v, p = est.iat[i, j], sig.iat[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}{'*' if np.isfinite(p) and p < alpha else ''}", ha="center",
                            va="center", fontsize=7)
        ax.set_title(f"{title} — {ck}" if len(checkpoints) > 1 else title, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    _save(fig, path)


def scatter(x: Any, y: Any, path: Path, xlabel: str, ylabel: str, note: str) -> None:
    """Metric vs rating with the least-squares line and the correlation in the title."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    ax.scatter(x, y, s=10, alpha=0.7)
    if len(x) > 1 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.linspace(np.min(x), np.max(x), 2)
        ax.plot(xs, slope * xs + intercept, color="C3")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(note, fontsize=8)
    _save(fig, path)


def r2_bars(table: Any, path: Path) -> None:
    """Cross-validated R² per metric (and checkpoint) with ± SD of the per-fold values."""
    plt = _pyplot()
    labels = [f"{m}" if table["checkpoint"].nunique() == 1 else f"{c}: {m}"
              for c, m in zip(table["checkpoint"], table["metric"])]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(table), 3.0))
    ax.bar(range(len(table)), table["estimate"], yerr=table["r2_fold_sd"], capsize=3, color="C0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("cross-validated R²", fontsize=8)
    _save(fig, path)


def activation_histograms(store: Any, path: Path, max_images: int = 256) -> None:
    """Per layer: activations per unit (mean across images) and per image (mean across units), as in the study."""
    import numpy as np

    plt = _pyplot()
    layers = store.layers
    fig, axes = plt.subplots(2, len(layers), figsize=(2.4 * len(layers), 4.2), squeeze=False)
    for j, layer in enumerate(layers):
        parts, seen = [], 0
        for _, values in store.iter_batches(layer, 64):
            parts.append(values.reshape(len(values), -1).astype(np.float32))
            seen += len(values)
            if seen >= max_images:
                break
        a = np.concatenate(parts)[:max_images]
        axes[0][j].hist(a.mean(0), bins=40, color="C0")
        axes[0][j].set_title(f"{layer}: per unit", fontsize=8)
        axes[1][j].hist(a.mean(1), bins=40, color="C1")
        axes[1][j].set_title(f"{layer}: per image", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
