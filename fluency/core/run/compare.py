"""``fluency compare DIR_A DIR_B``: how different are two versions of the same stimuli?

Pairs the images that have the same relative path (without extension, so ``a/x.jpg`` pairs
with ``a/x.png``) in both folders, reads both as fluency reads every image
(:func:`~fluency.core.inputs.images.load_image`: RGB floats in [0, 1]) and computes per pair:

- ``lpips``: LPIPS v0.1 with the options of the ``lpips`` metric plugin (``net``: alex, vgg or
  squeeze; ``weights``: a local backbone), given as for ``fluency run``: ``-o lpips.net=vgg``
  or a ``[lpips]`` table of ``--config``;
- ``l1``, ``l2``: mean absolute / squared pixel difference in [0, 1];
- ``1-ssim``: 1 − SSIM (pytorch-msssim, 11×11 window), a distance like the others (0 for identical
  images); ``ssim`` is accepted as its name when asking for it, but the table always says ``1-ssim``.

By default each pair is measured at its own size: LPIPS is fully convolutional and averages
over space, and l1, l2 and SSIM are means over pixels, so any size and aspect ratio will do,
while resizing to a square would change both the values and the aspect ratio. The two images
of a pair must then have the same size (else an error names both). With ``size`` = N both are
first brought to N×N as everywhere in fluency (shorter side scaled to N, Lanczos, centre crop).

These are the image distances of :data:`fluency.core.model.losses.LOSSES` (the training losses of
the same names), with l1 and l2 averaged over pixels instead of summed.

Files present in only one folder are reported, never silently dropped.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fluency.core.errors import FluencyError, InputError, OptionError
from fluency.core.plugin.config import read_config, resolve_plugin_options
from fluency.core.plugin.manager import PluginManager, get_plugin_manager

if TYPE_CHECKING:  # torch is imported where pairs are measured: a wrong argument answers without it
    import torch

#: the distances that compare offers, in the order of its table, each with the loss of LOSSES that computes it
METRICS = {"lpips": "lpips", "l1": "l1", "l2": "l2", "1-ssim": "ssim"}
#: names accepted for a metric that the table names otherwise (SSIM is a similarity; the distance is 1 − SSIM)
ALIASES = {"ssim": "1-ssim"}
#: the options of the ``lpips`` metric plugin that compare uses (``samples`` draws reconstructions: not here)
LPIPS_OPTIONS = ("net", "weights")
_WORKERS = 4


def chosen_metrics(names: Sequence[str]) -> list[str]:
    """The table names of the asked distances (``ssim`` → ``1-ssim``); an unknown one is one line."""
    metrics = [ALIASES.get(m, m) for m in names]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], [*METRICS, *ALIASES], n=1)
        raise FluencyError(f"compare: unknown metric(s) {unknown}{f'; did you mean {hint[0]!r}?' if hint else ''} "
                           f"(use some of {list(METRICS)})")
    return metrics


@dataclass
class Comparison:
    table: pd.DataFrame  # image (relative path without extension), metric, value
    only_in_a: list[str]
    only_in_b: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # image_size ("native" or N), lpips options


def _index(root: Path) -> dict[str, Path]:
    from fluency.core.inputs.images import find_images

    out: dict[str, Path] = {}
    for path in find_images(root):
        key = path.relative_to(root).with_suffix("").as_posix()
        if key in out:
            raise FluencyError(f"{root}: {out[key].name} and {path.name} have the same name; pairing is ambiguous")
        out[key] = path
    return out


def lpips_options(assignments: Sequence[str] = (), config: str | Path | None = None,
                  manager: PluginManager | None = None) -> dict[str, Any]:
    """The ``lpips`` metric plugin's ``net`` and ``weights``, resolved as ``fluency run`` resolves them
    (declared defaults, registry.toml, ``--config``, ``-o``); ``samples`` > 0 is an error here."""
    manager = manager or get_plugin_manager()
    resolved = resolve_plugin_options(manager, [("metric", "lpips")], assignments, read_config(config))
    options = resolved[("metric", "lpips")]
    if options.get("samples"):
        raise OptionError(f"lpips.samples={options['samples']}: compare measures two given images, there is no "
                          "reconstruction to sample; leave `samples` out (it is an option of `fluency run`)")
    return {key: options.get(key) for key in LPIPS_OPTIONS}


def _size_text(x: torch.Tensor) -> str:
    return f"{x.shape[-1]}×{x.shape[-2]}"


def _load_pair(a: Path, b: Path, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images of a pair; at their own size they must have the same width and height."""
    from fluency.core.inputs.images import load_image

    xa, xb = load_image(a, size), load_image(b, size)
    if xa.shape != xb.shape:
        raise InputError(f"compare: {a} is {_size_text(xa)} pixels but {b} is {_size_text(xb)}; make them the "
                         "same size, or measure both at N×N with --image-size N (size=N in Python)")
    return xa, xb


def _batches(pairs: Sequence[tuple[str, Path, Path]], size: int | None, batch_size: int
             ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """``(ids, A images, B images)`` in order, each batch of one image size (a run of consecutive pairs of
    that size, at most ``batch_size``); decoded ``batch_size`` pairs at a time on a few threads."""
    import torch

    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="fluency-compare") as pool:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            loaded = list(pool.map(lambda p: _load_pair(p[1], p[2], size), chunk))
            rows = zip((p[0] for p in chunk), loaded)
            for _, group in itertools.groupby(rows, key=lambda row: tuple(row[1][0].shape)):
                ids, images = zip(*group)
                yield list(ids), torch.stack([x[0] for x in images]), torch.stack([x[1] for x in images])


def _measure(name: str, distance: torch.nn.Module, xa: torch.Tensor, xb: torch.Tensor, ids: list[str]) -> torch.Tensor:
    """``distance(xa, xb)``; images too small for a network's pooling are one line naming their size."""
    try:
        return distance(xa, xb)
    except RuntimeError as exc:
        if "too small" not in str(exc):
            raise
        raise InputError(f"compare: {name} cannot measure {ids[0]} at {_size_text(xa)} pixels: too small for its "
                         "network; measure at a larger size with --image-size N") from None


def compare(dir_a: str | Path, dir_b: str | Path, metrics: Sequence[str] = ("lpips",), size: int | None = None,
            batch_size: int = 16, options: Sequence[str] = (), config: str | Path | None = None,
            device: str = "cpu", manager: PluginManager | None = None) -> Comparison:
    """Pairwise distances between same-named images of two folders, at their own size (``size`` None) or
    both resized to ``size``×``size``; ``options``/``config`` as ``-o``/``--config`` of ``fluency run``."""
    metrics = chosen_metrics(metrics)
    if size is not None and size < 1:
        raise FluencyError(f"compare: the image size must be positive, not {size}")
    settings: dict[str, Any] = {"image_size": "native" if size is None else size}
    plugin_options: dict[str, Mapping[str, Any]] = {}
    if "lpips" in metrics:
        plugin_options["lpips"] = settings["lpips"] = lpips_options(options, config, manager)
    else:  # no plugin is used: an -o or --config naming one is still checked (and refused) as by `run`
        resolve_plugin_options(manager or get_plugin_manager(), [], options, read_config(config))
    a, b = _index(Path(dir_a)), _index(Path(dir_b))
    common = sorted(set(a) & set(b))
    if not common:
        raise FluencyError(f"compare: no image has the same relative path in {dir_a} and {dir_b}")
    import torch

    from fluency.core.model.losses import LOSSES

    distances = {name: LOSSES[loss].build(plugin_options.get(loss), reduction="mean").to(device)
                 for name, loss in METRICS.items() if name in metrics}
    rows = []
    with torch.no_grad():
        for ids, xa, xb in _batches([(k, a[k], b[k]) for k in common], size, batch_size):
            xa, xb = xa.to(device), xb.to(device)
            for name, distance in distances.items():
                values = _measure(name, distance, xa, xb, ids).cpu().tolist()
                rows += [{"image": i, "metric": name, "value": float(x)} for i, x in zip(ids, values)]
    return Comparison(pd.DataFrame(rows, columns=["image", "metric", "value"]),
                      sorted(set(a) - set(b)), sorted(set(b) - set(a)), settings)
