"""Figures written as PNG files (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fluency.core.atomic import atomic_path


#: resolution of every saved raster figure; the report shows each PNG at its natural size, so a text of
#: ``s`` points is ``s * DPI / 72`` pixels on screen (the smallest text used, 6 pt, is 10 px)
DPI = 120
#: the widest a figure of panels may grow before its panels wrap onto another row (inches; 11 in × 120 dpi
#: fits the report's 1400-pixel page)
MAX_WIDTH = 11.0


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
            fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight",
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


def _text_width(labels: Any, points: float) -> float:
    """Rough width in inches of the longest of ``labels`` at ``points`` (a character is ~0.6 em)."""
    return max((len(str(x)) for x in labels), default=0) * 0.6 * points / 72


def heatmap_panels(panels: Sequence[tuple[str, Any, Any]], path: Path | Sequence[Path], title: str,
                   colour_label: str, value_range: tuple[float, float], alpha: float = 0.05) -> None:
    """Labelled heatmaps, one panel per ``(panel title, values, p-values or None)`` (DataFrames: row and
    column labels name the cells), sharing one colour scale labelled ``colour_label``; each cell shows its
    value, ``*`` where its p-value is below ``alpha``. Panels wrap to keep the figure within
    :data:`MAX_WIDTH` at 100 %; panels with the same rows label them once per row of panels."""
    import numpy as np

    n_rows = max(v.shape[0] for _, v, _ in panels)
    n_cols = max(v.shape[1] for _, v, _ in panels)
    shared = all(v.index.equals(panels[0][1].index) for _, v, _ in panels)
    label_w = _text_width([x for _, v, _ in panels for x in v.index], 8) + 0.15
    cell_w, cell_h, gap, bar_w = 0.55 * n_cols, 0.28 * n_rows, 0.25, 1.1
    panel_w = cell_w + gap + (0.0 if shared else label_w)
    per_row = max(1, min(len(panels), int((MAX_WIDTH - bar_w - label_w) // panel_w)))
    x_labels_h = 0.72 * _text_width([x for _, v, _ in panels for x in v.columns], 8) + 0.15
    panel_h = 0.3 + cell_h + x_labels_h  # title, cells, rotated column labels
    rows = -(-len(panels) // per_row)
    width, height = label_w + per_row * panel_w + bar_w, 0.35 + rows * panel_h
    fig = _pyplot().figure(figsize=(width, height))
    axes = []
    for k in range(len(panels)):  # placed by hand: constrained layout took seconds per figure
        row, col = divmod(k, per_row)
        left = label_w + col * panel_w
        bottom = height - 0.35 - row * panel_h - 0.3 - cell_h
        axes.append(fig.add_axes((left / width, bottom / height, cell_w / width, cell_h / height)))
    top = max(abs(value_range[0]), abs(value_range[1]))
    image = None
    for k, (ax, (name, values, p)) in enumerate(zip(axes, panels)):
        image = ax.imshow(values.to_numpy(float), cmap="RdBu_r", vmin=value_range[0], vmax=value_range[1],
                          aspect="auto")
        ax.set_xticks(range(values.shape[1]), [str(c) for c in values.columns], rotation=45, ha="right",
                      fontsize=8)
        ax.set_yticks(range(values.shape[0]), [str(r) for r in values.index] if not shared or k % per_row == 0
                      else [], fontsize=8)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values.iat[i, j]
                star = p is not None and np.isfinite(p.iat[i, j]) and p.iat[i, j] < alpha
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}{'*' if star else ''}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > 0.6 * top else "black")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    bar_h = max(0.8, min(height - 0.65 - x_labels_h, 4.0))
    bar_ax = fig.add_axes(((width - bar_w + 0.1) / width, (height - 0.65 - bar_h) / height, 0.15 / width,
                           bar_h / height))
    bar = fig.colorbar(image, cax=bar_ax)
    bar.set_label(colour_label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    _save(fig, path)


def _symmetric_range(values: Any, value_range: tuple[float, float] | None) -> tuple[float, float]:
    """``value_range``, or (None) symmetric around 0 from the largest finite |value| (±1 when there is none)."""
    import numpy as np

    if value_range is not None:
        return value_range
    finite = np.abs(np.asarray(values, dtype=float))
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if finite.size else 0.0
    return (-top, top) if top > 0 else (-1.0, 1.0)


def correlation_heatmap(table: Any, path: Path | Sequence[Path], title: str, alpha: float = 0.05,
                        value_range: tuple[float, float] | None = (-1.0, 1.0), colour_label: str = "estimate") -> None:
    """Metric × layer heatmap of an analysis' estimates (one panel per checkpoint, or checkpoint pair);
    * marks p_fdr < alpha. ``value_range`` is the colour scale (None: symmetric around 0, from the largest
    |estimate|); ``colour_label`` says what the colour means (e.g. "Pearson r")."""
    table = table.assign(layer=table["layer"].fillna("(whole)"))
    panels = []
    for ck in sorted(table["checkpoint"].unique()):
        sub = table[table["checkpoint"] == ck]
        est = sub.pivot_table(index="metric", columns="layer", values="estimate", aggfunc="first", dropna=False)
        sig = sub.pivot_table(index="metric", columns="layer", values="p_fdr", aggfunc="first",
                              dropna=False).reindex_like(est) if "p_fdr" in sub.columns else None
        panels.append((str(ck), est, sig))
    heatmap_panels(panels, path, title, colour_label, _symmetric_range(table["estimate"], value_range), alpha)


def subgroup_heatmap(table: Any, path: Path | Sequence[Path], title: str, colour_label: str,
                     value_range: tuple[float, float] | None = (-1.0, 1.0), alpha: float = 0.05) -> None:
    """Subgroup × layer heatmap of one checkpoint's estimates, one panel per metric; rows are the groups
    in the table's order, labelled with their n; * marks p_fdr < alpha."""
    table = table.assign(layer=table["layer"].fillna("(whole)"), group=table["group"].fillna("all"))
    order = list(dict.fromkeys(table["group"]))
    sizes = table.groupby("group")["n"].max()
    labels = {g: f"{g} (n={int(sizes[g])})" if g in sizes.index and sizes[g] == sizes[g] else g for g in order}
    panels = []
    for metric in sorted(table["metric"].unique()):
        sub = table[table["metric"] == metric]
        est = sub.pivot_table(index="group", columns="layer", values="estimate", aggfunc="first",
                              dropna=False).reindex([g for g in order if g in set(sub["group"])])
        sig = sub.pivot_table(index="group", columns="layer", values="p_fdr", aggfunc="first",
                              dropna=False).reindex_like(est) if "p_fdr" in sub.columns else None
        est.index = [labels[g] for g in est.index]
        if sig is not None:
            sig.index = est.index
        panels.append((str(metric), est, sig))
    heatmap_panels(panels, path, title, colour_label, _symmetric_range(table["estimate"], value_range), alpha)


def metric_correlation_matrix(matrices: Mapping[str, Any], path: Path | Sequence[Path], title: str,
                              colour_label: str = "Spearman ρ between metrics") -> None:
    """One metric × metric correlation panel per layer (``matrices``: layer → square DataFrame)."""
    heatmap_panels([(layer, m, None) for layer, m in matrices.items()], path, title, colour_label, (-1.0, 1.0))


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
    ax.tick_params(labelsize=8)
    ax.set_title(note, fontsize=8)
    _save(fig, path)


def r2_bars(table: Any, path: Path, ylabel: str = "cross-validated R²") -> None:
    """Cross-validated R² per metric (and checkpoint), with error bars of ± 1 SD of the per-fold R² where the
    table has them (``r2_fold_sd``: a spread over folds and repeats, not a confidence interval)."""
    plt = _pyplot()
    labels = [f"{m}" if table["checkpoint"].nunique() == 1 else f"{c}: {m}"
              for c, m in zip(table["checkpoint"], table["metric"])]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(table), 3.0))
    sd = table["r2_fold_sd"] if "r2_fold_sd" in table.columns else None
    ax.bar(range(len(table)), table["estimate"], yerr=sd, capsize=3, color="C0",
           label="R² of pooled out-of-fold predictions" + (" ± 1 SD of per-fold R²" if sd is not None else ""))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), frameon=False)
    _save(fig, path)


def replicate_dots(table: Any, path: Path, xlabel: str) -> None:
    """Dot and whisker per test (metric @ layer) and configuration of replicate models: the mean estimate over
    the configuration's models ± 1 SD (ddof = 1), one colour per configuration, its model count in the legend."""
    import numpy as np

    plt = _pyplot()
    tests = list(dict.fromkeys(zip(table["metric"], table["layer"])))
    names = list(dict.fromkeys(table["configuration"]))
    fig, ax = plt.subplots(figsize=(5.5, 1.2 + 0.32 * len(tests) * max(1, len(names)) ** 0.5))
    step = 0.7 / max(1, len(names))
    for k, name in enumerate(names):
        rows = table[table["configuration"] == name]
        y = [tests.index(t) + (k - (len(names) - 1) / 2) * step for t in zip(rows["metric"], rows["layer"])]
        sd = np.nan_to_num(rows["sd"].to_numpy(float))
        ax.errorbar(rows["mean"].to_numpy(float), y, xerr=sd, fmt="o", markersize=4, capsize=3, color=f"C{k % 10}",
                    label=f"{name} ({int(rows['n_models'].max())} models)")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(tests)), [f"{m}" if layer is None or layer != layer else f"{m} @ {layer}"
                                      for m, layer in tests], fontsize=8)
    ax.set_ylim(len(tests) - 0.5, -0.5)  # the first test on top
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(f"{xlabel}: mean ± 1 SD over the models", fontsize=8)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), frameon=False, title="configuration",
              title_fontsize=7)
    _save(fig, path)


def activation_histograms(store: Any, path: Path, max_images: int = 256) -> None:
    """Per layer: activations per unit (mean across the first ``max_images`` images; y: units) and per image
    (mean across units; y: images), as in the study."""
    plt = _pyplot()
    layers = store.layers
    fig, axes = plt.subplots(2, len(layers), figsize=(2.2 * len(layers), 4.8), squeeze=False)
    for j, layer in enumerate(layers):
        per_unit, per_image = _layer_means(store, layer, max_images)
        for ax, values, what, counted, colour in ((axes[0][j], per_unit, "per unit", "units", "C0"),
                                                  (axes[1][j], per_image, "per image", "images", "C1")):
            ax.hist(values, bins=40, color=colour)
            ax.set_title(f"{layer}: {what}", fontsize=8)
            ax.set_xlabel("mean activation over " + ("images" if counted == "units" else "units"), fontsize=8)
            ax.set_ylabel(counted, fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, path)


def _layer_means(store: Any, layer: str, max_images: int) -> tuple[Any, Any]:
    """(mean of each unit over the first ``max_images`` images, mean of each of those images over the units),
    read batch by batch: no float32 copy of all those images' activations at once."""
    import numpy as np

    total, per_image, seen = None, [], 0
    for _, values in store.iter_batches(layer, 64):
        part = values[:max_images - seen]
        rows = part.reshape(len(part), -1).astype(np.float32)
        total = rows.sum(0, dtype=np.float64) + (0.0 if total is None else total)
        per_image.append(rows.mean(1, dtype=np.float64))
        seen += len(rows)
        if seen >= max_images:
            break
    return total / seen, np.concatenate(per_image)
