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


def _save(fig: Any, path: Path | Sequence[Path]) -> None:
    """Write ``fig`` atomically to one path or to several (e.g. PNG for the report and SVG for papers), then close it.

    SVG and PDF carry no creation date, so the same figure gives the same bytes.
    """
    for target in [path] if isinstance(path, Path) else list(path):
        target.parent.mkdir(parents=True, exist_ok=True)
        fmt = target.suffix.lstrip(".") or "png"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight",
                        metadata={"Date": None} if fmt in ("svg", "pdf") else None)
    _pyplot().close(fig)


def _mosaic(rows: Sequence[Sequence[torch.Tensor]], pad: int = 2) -> Any:
    """Tile rows of equally sized ``C×H×W`` images in [0, 1] into one RGB array with white gaps.

    One ``imshow`` of a mosaic draws many times faster than one axes per image.
    """
    import numpy as np

    c, h, w = rows[0][0].shape
    n_cols = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * (h + pad) - pad, n_cols * (w + pad) - pad, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            pixels = img.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
            canvas[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = (
                np.repeat(pixels, 3, axis=2) if c == 1 else pixels)
    return canvas


def _tile_centre(index: int, size: int, pad: int = 2) -> float:
    return index * (size + pad) + (size - 1) / 2


def training_curves(history: Sequence[Mapping[str, float]], path: Path | Sequence[Path]) -> None:
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
def reconstruction_grid(model: Any, source: Any, indices: Sequence[int], path: Path | Sequence[Path],
                        device: torch.device, labels: Sequence[str] | None = None, title: str | None = None) -> None:
    """Images (top row) above their reconstructions with z = mu (bottom row); ``labels`` name the columns."""
    plt = _pyplot()
    was_training = model.training
    model.eval()
    images = torch.stack([source.load(i) for i in indices]).to(device)
    recon = model(images, sample=False).recon.clamp(0, 1)
    model.train(was_training)
    _, h, w = images.shape[1:]
    fig, ax = plt.subplots(figsize=(1.3 * len(indices), 2.8 + 0.3 * bool(title) + 0.25 * (labels is not None)))
    ax.imshow(_mosaic([list(images.cpu()), list(recon.cpu())]), interpolation="nearest")
    ax.axis("off")
    for col, text in enumerate(labels or []):
        ax.text(_tile_centre(col, w), -3, text, ha="center", va="bottom", fontsize=6)
    ax.text(-4, _tile_centre(0, h), "images", ha="right", va="center", rotation=90, fontsize=7)
    ax.text(-4, _tile_centre(1, h), "reconstructions", ha="right", va="center", rotation=90, fontsize=7)
    if title:
        ax.set_title(title, fontsize=8, pad=22 if labels is not None else 6)
    _save(fig, path)


def interpolation_strip(image_a: torch.Tensor, image_b: torch.Tensor, decoded: torch.Tensor, ts: Sequence[float],
                        path: Path | Sequence[Path], title: str) -> None:
    """One row: image A, the decodings along the line from mu_A to mu_B (at ``ts``), image B."""
    plt = _pyplot()
    _, _, w = image_a.shape
    n = len(decoded)
    fig, ax = plt.subplots(figsize=(1.0 * (n + 2), 1.7))
    ax.imshow(_mosaic([[image_a, *decoded, image_b]]), interpolation="nearest")
    ax.axis("off")
    names = ["image A"] + [f"t={t:.2f}" for t in ts] + ["image B"]
    for col, name in enumerate(names):
        ax.text(_tile_centre(col, w), -3, name, ha="center", va="bottom", fontsize=6,
                fontweight="bold" if name.startswith("image") else None)
    ax.set_title(title, fontsize=8, pad=14)
    _save(fig, path)


def latent_projection(coords: Any, paths: Path | Sequence[Path], title: str, axis_labels: tuple[str, str],
                      values: Any = None, value_label: str = "", groups: Any = None) -> None:
    """2-D scatter of projected latent means, coloured by ``values`` (colour bar) or by ``groups`` (legend).

    Points without a value (NaN, e.g. unrated images) are grey.
    """
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    if groups is not None:
        groups = np.asarray(groups, dtype=object)
        for k, g in enumerate(sorted(set(groups), key=str)):
            sel = groups == g
            ax.scatter(coords[sel, 0], coords[sel, 1], s=10, alpha=0.75, color=f"C{k % 10}", label=str(g))
        ax.legend(fontsize=6, markerscale=1.5, loc="best", frameon=False)
    elif values is not None:
        values = np.asarray(values, dtype=float)
        known = np.isfinite(values)
        if (~known).any():
            ax.scatter(coords[~known, 0], coords[~known, 1], s=8, color="0.75", label="no rating")
            ax.legend(fontsize=6, frameon=False)
        points = ax.scatter(coords[known, 0], coords[known, 1], c=values[known], s=10, cmap="viridis", alpha=0.85)
        fig.colorbar(points, ax=ax).set_label(value_label, fontsize=8)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=10, alpha=0.75)
    ax.set_xlabel(axis_labels[0], fontsize=8)
    ax.set_ylabel(axis_labels[1], fontsize=8)
    ax.set_title(title, fontsize=8)
    _save(fig, paths)


def correlation_heatmap(table: Any, path: Path, title: str, alpha: float = 0.05,
                        value_range: tuple[float, float] | None = (-1.0, 1.0)) -> None:
    """Metric × layer heatmap of an analysis' estimates (one panel per checkpoint); * marks p_fdr < alpha.

    ``value_range`` is the colour scale (None: symmetric around 0, from the largest |estimate|)."""
    import numpy as np

    if value_range is None:
        top = float(np.nanmax(np.abs(table["estimate"].to_numpy(float)))) if len(table) else 1.0
        value_range = (-top, top) if np.isfinite(top) and top > 0 else (-1.0, 1.0)

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
        image = ax.imshow(est.to_numpy(float), cmap="RdBu_r", vmin=value_range[0], vmax=value_range[1],
                          aspect="auto")
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


def r2_bars(table: Any, path: Path, ylabel: str = "cross-validated R²") -> None:
    """Cross-validated R² per metric (and checkpoint), with ± SD of the per-fold values where the table has
    them (``r2_fold_sd``)."""
    plt = _pyplot()
    labels = [f"{m}" if table["checkpoint"].nunique() == 1 else f"{c}: {m}"
              for c, m in zip(table["checkpoint"], table["metric"])]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(table), 3.0))
    sd = table["r2_fold_sd"] if "r2_fold_sd" in table.columns else None
    ax.bar(range(len(table)), table["estimate"], yerr=sd, capsize=3, color="C0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
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
        axes[0][j].hist(a.mean(0, dtype=np.float64), bins=40, color="C0")
        axes[0][j].set_title(f"{layer}: per unit", fontsize=8)
        axes[1][j].hist(a.mean(1, dtype=np.float64), bins=40, color="C1")
        axes[1][j].set_title(f"{layer}: per image", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
