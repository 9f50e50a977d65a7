"""The figures of a run that need the model: latent means, reconstruction grids, interpolation strips,
training curves.

The model and the images are at hand only while ``fluency run`` measures a checkpoint, so
:class:`ModelFigures`, the run's checkpoint observer, calls :func:`write_checkpoint_figures` once per
checkpoint. It writes

- ``latents/<checkpoint>.parquet``: ``image_id, mu_0 … mu_{k-1}``, the latent mean of every image
  (the report projects them to 2-D, so ``fluency report`` can redraw that figure without the model);
- ``figures/recon-<checkpoint>.png``: 8 images spread over the rating range (lowest to highest;
  the first 8 without ratings) above their reconstructions with z = μ;
- ``figures/interp-<checkpoint>-<k>.png``: the decodings at evenly spaced points on the straight
  line from μ_A to μ_B, endpoints included, for each pair of images (``--interpolate A,B``; default the
  lowest- and highest-rated image, or the first and last image without ratings);
- ``figures/curves-<checkpoint>.png``: the training curves, when the checkpoint carries a history.

Everything is deterministic (z = μ, fixed choice of images) and written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fluency.core.outputs import figures
from fluency.core.atomic import atomic_path
from fluency.core.model.checkpoint import LoadedCheckpoint
from fluency.core.errors import FluencyError
from fluency.core.inputs.images import ImageSource, Preprocessing, iter_batches
from fluency.core.inputs.stimuli import Stimuli
from fluency.core.run.pipeline import Latents, MeasuredCheckpoint

GRID_IMAGES = 8
INTERPOLATION_STEPS = 8


def _rated_order(ids: Sequence[str], stimuli: Stimuli) -> list[str]:
    """Ids of the rated images among ``ids``, lowest rating first (ties by id); empty without ratings."""
    if stimuli.ratings is None:
        return []
    known = set(ids)
    table = stimuli.ratings[stimuli.ratings["image_id"].astype(str).isin(known)]
    table = table.assign(image_id=table["image_id"].astype(str)).sort_values(
        [stimuli.rating_column, "image_id"], kind="mergesort")
    return list(table["image_id"])


def interpolation_pairs(values: Sequence[str | tuple[str, str]], stimuli: Stimuli) -> list[tuple[str, str]]:
    """The pairs to interpolate between, checked against the stimuli's image ids.

    ``values`` are ``"ID_A,ID_B"`` strings or ``(ID_A, ID_B)`` tuples; none gives the default pair (the
    lowest- and highest-rated image, or the first and last image without ratings). An unknown id is a
    :class:`FluencyError` naming it, raised before anything is measured.
    """
    ids = stimuli.make_source(Preprocessing(64, 3)).ids  # ids do not depend on the preprocessing
    pairs: list[tuple[str, str]] = []
    for value in values:
        parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p) for p in value]
        if len(parts) != 2 or not all(parts):
            raise FluencyError(f"--interpolate {value!r}: give two image ids separated by a comma, e.g. ID_A,ID_B")
        pairs.append((parts[0], parts[1]))
    known = set(ids)
    for a, b in pairs:
        for image_id in (a, b):
            if image_id not in known:
                raise FluencyError(f"--interpolate: no image with id {image_id!r} among the {len(ids)} stimuli "
                                   f"(ids look like {', '.join(map(repr, ids[:3]))})")
    if pairs or len(ids) < 2:
        return pairs
    rated = _rated_order(ids, stimuli)
    return [(rated[0], rated[-1])] if len(rated) >= 2 else [(ids[0], ids[-1])]


def grid_indices(ids: Sequence[str], stimuli: Stimuli, n: int = GRID_IMAGES) -> list[int]:
    """Source indices of ``n`` images evenly spread over the rating order (lowest to highest), else the first ``n``."""
    rated = _rated_order(ids, stimuli)
    if len(rated) < 2:
        return list(range(min(n, len(ids))))
    position = {image_id: k for k, image_id in enumerate(ids)}
    picks = np.unique(np.linspace(0, len(rated) - 1, min(n, len(rated))).round().astype(int))
    return [position[rated[k]] for k in picks]


@torch.no_grad()
def latent_means(model: Any, source: ImageSource, device: torch.device, batch_size: int = 64) -> Latents:
    """``(ids, N×k float32 means, shape of one mean)``: μ of every image, batch by batch, in eval mode."""
    was_training = model.training
    model.eval()
    ids: list[str] = []
    parts: list[np.ndarray] = []
    shape: tuple[int, ...] = ()
    try:
        for batch_ids, x in iter_batches(source, batch_size):
            mu = model.latent(model(x.to(device), sample=False))
            if mu is None:
                break
            shape = tuple(mu.shape[1:])
            parts.append(mu.flatten(1).float().cpu().numpy())
            ids += batch_ids
    finally:
        model.train(was_training)
    return Latents(ids, np.concatenate(parts) if parts else np.zeros((0, 0), np.float32), shape)


@torch.no_grad()
def interpolate(model: Any, mu_a: torch.Tensor, mu_b: torch.Tensor,
                steps: int = INTERPOLATION_STEPS) -> tuple[torch.Tensor, list[float]]:
    """Decodings at ``steps`` evenly spaced points from ``mu_a`` to ``mu_b`` (both included), clamped to [0, 1]."""
    if steps < 2:
        raise FluencyError(f"an interpolation needs at least 2 steps, not {steps}")
    was_training = model.training
    model.eval()
    ts = torch.linspace(0, 1, steps, device=mu_a.device, dtype=mu_a.dtype)
    shape = (steps,) + (1,) * mu_a.dim()
    z = (1 - ts.view(shape)) * mu_a.unsqueeze(0) + ts.view(shape) * mu_b.unsqueeze(0)
    z[0], z[-1] = mu_a, mu_b  # exactly the endpoints, whatever the rounding
    decoded = model.decode(z).clamp(0, 1)
    model.train(was_training)
    return decoded, ts.tolist()


def write_latents(path: Path, ids: Sequence[str], mu: np.ndarray) -> None:
    """``image_id, mu_0 … mu_{k-1}`` as Parquet, written atomically."""
    table = pd.DataFrame({"image_id": list(ids), **{f"mu_{j}": mu[:, j] for j in range(mu.shape[1])}})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def _short(text: str, width: int = 14) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def write_checkpoint_figures(loaded: LoadedCheckpoint, stimuli: Stimuli, out_dir: Path, device: torch.device,
                             pairs: Sequence[tuple[str, str]], batch_size: int = 64, latents: Latents | None = None,
                             steps: int = INTERPOLATION_STEPS) -> dict[str, str]:
    """Write the latents table and the model figures of one checkpoint (see the module docstring).

    ``pairs`` come from :func:`interpolation_pairs`; ``latents`` are the means if the caller has them
    (the run reads them off its measuring pass), else they are computed here. Returns
    ``{figure path relative to out_dir: caption}`` for the report.
    """
    label, model = loaded.label, loaded.model.to(device)
    channels, size, _ = model.input_shape
    source = stimuli.make_source(Preprocessing(size, channels))
    fig_dir = out_dir / "figures"
    written: dict[str, str] = {}

    if "latent" not in model.provides:
        return _curves(loaded, fig_dir, {})
    ids, mu, mu_shape = latents if latents is not None else latent_means(model, source, device, batch_size)
    write_latents(out_dir / "latents" / f"{label}.parquet", ids, mu)
    if "decoder" not in model.provides:
        return _curves(loaded, fig_dir, written)

    ratings = {} if stimuli.ratings is None else dict(zip(stimuli.ratings["image_id"].astype(str),
                                                          stimuli.ratings[stimuli.rating_column]))
    indices = grid_indices(ids, stimuli)
    if indices:
        names = [_short(ids[i]) + (f"\n{ratings[ids[i]]:.2f}" if ids[i] in ratings else "") for i in indices]
        order = f"spread over the {stimuli.rating_column} range, lowest first" if len(ratings) >= 2 else "the first"
        stem = fig_dir / f"recon-{label}"
        figures.reconstruction_grid(model, source, indices, stem.with_suffix(".png"), device, names,
                                    f"{label}: images ({order}) and reconstructions with z = μ")
        written[f"figures/recon-{label}.png"] = (f"Reconstructions ({label}): {len(indices)} images {order} "
                                                 f"(top), decoded from z = μ (bottom).")

    position = {image_id: k for k, image_id in enumerate(ids)}
    for k, (a, b) in enumerate(pairs):
        ia, ib = position[a], position[b]
        mu_a = torch.from_numpy(mu[ia]).view(mu_shape).to(device)
        mu_b = torch.from_numpy(mu[ib]).view(mu_shape).to(device)
        decoded, ts = interpolate(model, mu_a, mu_b, steps)
        stem = fig_dir / f"interp-{label}-{k}"
        figures.interpolation_strip(source.load(ia), source.load(ib), decoded.cpu(), ts,
                                    stem.with_suffix(".png"), f"{label}: decodings on the line from "
                                    f"μ(A = {_short(a, 30)}) to μ(B = {_short(b, 30)})")
        written[f"figures/interp-{label}-{k}.png"] = (
            f"Latent interpolation ({label}): decodings at {steps} evenly spaced points on the line from "
            f"μ(A = {a}) to μ(B = {b}), endpoints included, between the images themselves"
            + "".join(f"; {n}: {stimuli.rating_column} {ratings[i]:.2f}" for n, i in (("A", a), ("B", b))
                      if i in ratings) + ".")
    return _curves(loaded, fig_dir, written)


def _curves(loaded: LoadedCheckpoint, fig_dir: Path, written: dict[str, str]) -> dict[str, str]:
    """Add the training curves stored in the checkpoint (if any) to ``written``; return it."""
    label = loaded.label
    history = loaded.info.get("history") or []
    skip = {"epoch", "beta", "lr", "seconds"}
    if history and isinstance(history[0], dict) and "epoch" in history[0] and any(
            k not in skip and not k.startswith("val_") for k in history[0]):
        stem = fig_dir / f"curves-{label}"
        figures.training_curves(history, stem.with_suffix(".png"))
        written[f"figures/curves-{label}.png"] = (f"Training curves ({label}): loss terms per epoch over "
                                                  f"{len(history)} epochs, as stored in the checkpoint.")
    return written


class ModelFigures:
    """The run's checkpoint observer that writes the latents and model figures of every checkpoint.

    ``interpolate``: ``"ID_A,ID_B"`` pairs (none: the default pair), checked against the stimuli in
    :meth:`start`, before anything is measured.
    """

    def __init__(self, interpolate: Sequence[str | tuple[str, str]] = (), steps: int = INTERPOLATION_STEPS) -> None:
        self.interpolate, self.steps = list(interpolate), steps
        self.pairs: list[tuple[str, str]] = []

    def start(self, stimuli: Stimuli) -> dict[str, Any]:
        self.pairs = interpolation_pairs(self.interpolate, stimuli)
        return {"interpolate": [list(p) for p in self.pairs]}

    def measured(self, checkpoint: MeasuredCheckpoint) -> dict[str, Any]:
        return write_checkpoint_figures(checkpoint.loaded, checkpoint.stimuli, checkpoint.out_dir, checkpoint.device,
                                        self.pairs, checkpoint.batch_size, checkpoint.latents, self.steps)
