"""How ``fluency train`` reads its images: data-loader worker processes decode them while the model steps.

``workers`` (``--workers N|auto``) is the number of decoding processes; 0 decodes in the training process, as
earlier versions did. The loaders are persistent (their workers live for the whole run) and pin their batches in
page-locked memory when the model is on a CUDA device, so a batch is copied to it while the next is decoded.

Decoding takes no random numbers and every batch is assembled in the sampler's order whichever worker decoded
it, so the number of workers never changes a trained model: a seed gives the same weights with any ``workers``,
and the same as earlier versions (:func:`epoch_order`, :func:`fresh_pass`).

An image that cannot be read travels from the worker as data (:class:`Unreadable`) and is raised in the training
process as the one-line :class:`~fluency.core.errors.InputError` naming the file that no workers would give; a
worker that dies (killed, out of memory) is one :class:`~fluency.core.errors.TrainingError` line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fluency.core.errors import FluencyError, OptionError, TrainingError
from fluency.core.inputs.images import ImageSource

#: ``workers = "auto"`` never starts more decoding processes than this (more rarely pays at training's image sizes)
MAX_AUTO_WORKERS = 4


def parse_workers(value: object) -> int | str:
    """``"auto"`` or a whole number ≥ 0 (also written as a string, as on the command line); else one
    :class:`OptionError` line."""
    if value == "auto":
        return "auto"
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise OptionError(f"train: workers {value!r}: give a number of image-decoding processes (0 decodes in the "
                          "training process) or 'auto'")
    return int(text)


def available_cpus() -> int:
    """The cores this process may run on (its affinity, e.g. a SLURM allocation), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(setting: object, device_type: str = "cpu", cpus: int | None = None) -> int:
    """The number of decoding processes for the ``workers`` setting: as given, or for ``auto`` one per core but
    one, kept for the training step, at most :data:`MAX_AUTO_WORKERS`, and none on one core. Training on the CPU
    on two cores, ``auto`` is 0 too: torch's two threads already fill them, and a decoding process beside them
    measured 5 % slower (``vae-small`` at 64×64, docs/benchmarks.md)."""
    workers = parse_workers(setting)
    if workers != "auto":
        return int(workers)
    cpus = cpus or available_cpus()
    return 0 if device_type == "cpu" and cpus <= 2 else max(0, min(MAX_AUTO_WORKERS, cpus - 1))


@dataclass(frozen=True)
class Unreadable:
    """An image a loader could not read: its error, carried to the training process as data (an exception
    raised in a worker would come back as a multi-line message wrapped around the worker's traceback)."""

    error: FluencyError


class ImageSubset(Dataset):
    """The images ``indices`` of ``source``, each one float tensor, or :class:`Unreadable`."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor | Unreadable:
        try:
            return self.source.load(self.indices[i])
        except FluencyError as exc:
            return Unreadable(exc)


def collate(items: list[Any]) -> torch.Tensor | Unreadable:
    """The images stacked into a batch, or the first :class:`Unreadable` among them."""
    bad = next((item for item in items if isinstance(item, Unreadable)), None)
    return bad if bad is not None else default_collate(items)


class Order(Sampler[int]):
    """The order a loader reads its images in, set before each pass (a persistent loader is iterated again
    every epoch, and each epoch reads the training images in its own order)."""

    def __init__(self, n: int) -> None:
        self.order = list(range(n))

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def epoch_order(n: int, seed: int) -> list[int]:
    """A seeded shuffle of ``range(n)``: the permutation a shuffling ``DataLoader`` drew from a generator seeded
    with ``seed`` (a base seed for its workers first, then ``randperm``), which is how earlier versions ordered an
    epoch; so a seed keeps training the same model."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed, unused here
    return torch.randperm(n, generator=generator).tolist()


def image_loader(source: ImageSource, indices: Sequence[int], batch_size: int, workers: int, device: torch.device,
                 order: Order | None = None) -> DataLoader:
    """A persistent loader of the images ``indices`` in batches, in ``order`` (default: as listed), decoded by
    ``workers`` processes (0: in this one), pinned for a CUDA ``device``. Its generator is its own, so iterating it
    takes nothing from torch's global generator (see :func:`fresh_pass`)."""
    return DataLoader(ImageSubset(source, indices), batch_size=batch_size, sampler=order, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda", collate_fn=collate,
                      generator=torch.Generator())


def batches(loader: DataLoader, device: torch.device) -> Iterator[torch.Tensor]:
    """One pass over ``loader``, each batch moved to ``device``; an unreadable image or a dead worker stops it
    with one line."""
    try:
        for batch in loader:
            if isinstance(batch, Unreadable):
                raise batch.error
            yield batch.to(device, non_blocking=True)
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
        raise TrainingError(f"an image-decoding worker stopped ({' '.join(str(exc).split())}); training stopped. "
                            "--workers 0 decodes in the training process (and names an image that cannot be "
                            "read)") from None


def fresh_pass(loader: DataLoader, device: torch.device) -> Iterator[torch.Tensor]:
    """:func:`batches` of a loader that earlier versions created afresh for each pass: such a loader drew a base
    seed from torch's global generator, which is drawn here too (and not used), so the random numbers that follow
    (a VAE's sampled latents) and with them the trained weights stay those of a seed in earlier versions."""
    torch.empty((), dtype=torch.int64).random_()
    return batches(loader, device)
