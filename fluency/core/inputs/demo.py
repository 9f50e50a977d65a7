"""The embedded default: a procedurally generated, rated stimulus set.

Each image is a smooth colour gradient with ``clutter`` random shapes (ellipses,
rectangles, lines) drawn on it. The synthetic rating falls with clutter::

    rating = clip(5.5 − 0.25 · clutter + N(0, 0.6), 1, 7)

so a model that processes simple images more economically (sparser activations)
and more robustly (flatter loss) should show fluency metrics that rise with the
rating: Gini up, SAM sharpness down. Everything is deterministic from the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from fluency.core.errors import FluencyError

DEFAULT_N = 240
DEFAULT_SIZE = 64
DEFAULT_SEED = 0
MAX_CLUTTER = 16


def _render(rng: np.random.Generator, size: int, clutter: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    c0, c1 = rng.uniform(0.0, 0.25, 3), rng.uniform(0.0, 0.25, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xs + np.sin(angle) * ys + 1.5) / 3.0
    bg = (c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]) * 255
    img = Image.fromarray(bg.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(clutter):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.1, 0.9, 2) * size
        w, h = rng.uniform(0.08, 0.35, 2) * size
        box = [x0, y0, x0 + w, y0 + h]
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(img)


def generate(n: int = DEFAULT_N, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, pd.DataFrame]:
    """``n`` images (uint8, N×H×W×3) and their ratings table (``image_id, rating, clutter``)."""
    rng = np.random.default_rng(seed)
    clutter = rng.integers(0, MAX_CLUTTER + 1, n)
    images = np.stack([_render(rng, size, int(k)) for k in clutter])
    rating = np.clip(5.5 - 0.25 * clutter + rng.normal(0, 0.6, n), 1, 7).round(2)
    return images, pd.DataFrame({"image_id": _ids(n), "rating": rating, "clutter": clutter})


def _ids(n: int) -> list[str]:
    return [f"stim-{i:03d}" for i in range(n)]


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×C → float32 N×C×H×W in [0, 1], exactly as a PNG of the image would load."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


def export(folder: str | Path, n: int = DEFAULT_N, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED,
           overwrite: bool = False) -> Path:
    """Write the stimuli as ``folder/images/ID.png`` and ``folder/ratings.csv``; return the folder. A file of
    those names that exists already is replaced only with ``overwrite``."""
    folder = Path(folder)
    targets = [folder / "ratings.csv", *(folder / "images" / f"{image_id}.png" for image_id in _ids(n))]
    taken = [str(p.relative_to(folder)) for p in targets if p.exists() or p.is_symlink()]
    if taken and not overwrite:
        raise FluencyError(f"{folder} already holds {', '.join(taken[:3])}{' …' if len(taken) > 3 else ''}; pass "
                           "--overwrite to replace them, or choose another folder")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, ratings = generate(n, size, seed)
    for image_id, pixels in zip(ratings["image_id"], images):
        Image.fromarray(pixels, "RGB").save(folder / "images" / f"{image_id}.png")
    ratings.to_csv(folder / "ratings.csv", index=False)
    return folder
