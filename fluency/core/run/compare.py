"""``fluency compare DIR_A DIR_B``: how different are two versions of the same stimuli?

Pairs the images that have the same relative path (without extension, so ``a/x.jpg`` pairs
with ``a/x.png``) in both folders, brings both to ``size``×``size`` (shorter side + centre
crop, as everywhere in fluency) and computes per pair:

- ``lpips``: LPIPS v0.1 (``net`` alex, vgg or squeeze; backbone as for the lpips metric);
- ``l1``, ``l2``: mean absolute / squared pixel difference in [0, 1];
- ``ssim``: 1 − SSIM (pytorch-msssim, 11×11 window).

These are the image distances of :data:`fluency.core.model.losses.LOSSES` (the training losses of
the same names), with l1 and l2 averaged over pixels instead of summed.

Files present in only one folder are reported, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fluency.core.errors import FluencyError
from fluency.core.inputs.images import FolderSource, Preprocessing, find_images, iter_batches
from fluency.core.model.losses import LOSSES

#: the distances of LOSSES that compare offers, in the order of its table
METRICS = ("lpips", "l1", "l2", "ssim")


@dataclass
class Comparison:
    table: pd.DataFrame  # image (relative path without extension), metric, value
    only_in_a: list[str]
    only_in_b: list[str]


def _index(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in find_images(root):
        key = path.relative_to(root).with_suffix("").as_posix()
        if key in out:
            raise FluencyError(f"{root}: {out[key].name} and {path.name} have the same name; pairing is ambiguous")
        out[key] = path
    return out


def compare(dir_a: str | Path, dir_b: str | Path, metrics: Sequence[str] = ("lpips",), size: int = 256,
            batch_size: int = 16, net: str = "alex", weights: str | None = None,
            device: str = "cpu") -> Comparison:
    """Pairwise distances between same-named images of two folders."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise FluencyError(f"compare: unknown metric(s) {unknown}; use some of {list(METRICS)}")
    a, b = _index(Path(dir_a)), _index(Path(dir_b))
    common = sorted(set(a) & set(b))
    if not common:
        raise FluencyError(f"compare: no image has the same relative path in {dir_a} and {dir_b}")
    pre = Preprocessing(size, 3)
    src_a = FolderSource(Path(dir_a), {k: a[k] for k in common}, pre)
    src_b = FolderSource(Path(dir_b), {k: b[k] for k in common}, pre)
    options = {"lpips": {"net": net, "weights": weights}}
    distances = {name: LOSSES[name].build(options.get(name), reduction="mean").to(device)
                 for name in METRICS if name in metrics}
    rows = []
    with torch.no_grad():
        for (ids, xa), (_, xb) in zip(iter_batches(src_a, batch_size), iter_batches(src_b, batch_size)):
            xa, xb = xa.to(device), xb.to(device)
            for name, distance in distances.items():
                values = distance(xa, xb).cpu().tolist()
                rows += [{"image": i, "metric": name, "value": float(x)} for i, x in zip(ids, values)]
    return Comparison(pd.DataFrame(rows, columns=["image", "metric", "value"]),
                      sorted(set(a) - set(b)), sorted(set(b) - set(a)))
