"""What a run measures: the stimuli, their ids, and the ratings they can be analysed with.

Either a folder of images (with an optional ratings table, matched by
:func:`fluency.core.inputs.ratings.match_ids`) or the embedded default of
:mod:`fluency.core.inputs.demo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fluency.core.inputs import demo
from fluency.core.errors import InputError
from fluency.core.inputs.images import (FolderSource, ImageSource, Preprocessing, TensorSource, find_unreadable,
                                        scan_images)
from fluency.core.inputs.ratings import (MatchReport, check_any_matched, check_strict, empty_rating_ids, first_row,
                                  match_ids, read_ratings)


@dataclass
class Stimuli:
    """A set of images to measure, and the ratings of those that can enter analyses.

    ``ratings`` has one row per analysable image (matched to a file, finite rating)
    with ``image_id``, ``rating_column`` and the table's other columns; it is None
    when the run has no ratings. ``unreadable`` maps the relative paths of image
    files that cannot be decoded (left out of the source) to the decoder's reason.
    """

    make_source: Callable[[Preprocessing], ImageSource]
    ratings: pd.DataFrame | None
    rating_column: str
    report: MatchReport | None
    description: dict[str, Any]
    unreadable: dict[str, str] = field(default_factory=dict)


def default_ids(root: Path, files: list[Path]) -> dict[Path, str]:
    """Ids of unrated images: the file stem where stems are unique, else the relative path without
    extension, else (``a.png`` beside ``a.jpg``) the relative path with it — never two files one id."""
    stems = [p.stem for p in files]
    if len(set(stems)) == len(stems):
        return {p: p.stem for p in files}
    noext = [p.relative_to(root).with_suffix("").as_posix() for p in files]
    if len(set(noext)) == len(noext):
        return dict(zip(files, noext))
    return {p: p.relative_to(root).as_posix() for p in files}


def from_folder(images: str | Path, ratings: str | Path | None, id_column: str, rating_column: str,
                strict: bool = False) -> Stimuli:
    """Stimuli from a folder of images and an optional ratings table (CSV or Parquet).

    Every image is decoded once up front; files that cannot be, and entries with an image's
    name that are not regular files (a named pipe, never opened), are left out and listed in
    ``unreadable`` (and the report), or with ``strict`` are an :class:`InputError`.
    """
    root = Path(images)
    regular, skipped = scan_images(root)
    found = sorted([*regular, *skipped], key=lambda p: p.relative_to(root).as_posix())
    problems = {**skipped, **find_unreadable(regular)}
    problems = {p: problems[p] for p in found if p in problems}  # in the folder's order
    if problems and strict:
        raise InputError(f"--strict: {len(problems)} image{'s' if len(problems) > 1 else ''} cannot be read: "
                         + "; ".join(f"{path} ({why})" for path, why in problems.items()))
    files = [p for p in found if p not in problems]
    if not files:
        raise InputError(f"no readable images in {root}: all {len(found)} cannot be read, e.g. "
                         + "; ".join(f"{path} ({why})" for path, why in list(problems.items())[:3]))
    unreadable = {p.relative_to(root).as_posix(): why for p, why in problems.items()}
    ids = default_ids(root, files)
    table, report = None, None
    if ratings is not None:
        table = read_ratings(ratings, id_column, rating_column)
        report = match_ids(list(table["image_id"]), root, found,  # unreadable files too, so ids are not misread
                           empty_ratings=empty_rating_ids(table, rating_column), source=ratings,
                           rows=range(first_row(ratings), first_row(ratings) + len(table)))
        report.drop_unreadable(root, problems)
        check_any_matched(report, ratings, id_column)
        if strict:
            check_strict(report, ratings)
        for image_id, path in report.matched.items():
            ids[Path(path)] = image_id
        taken: dict[str, Path] = {}
        for path, image_id in ids.items():
            if image_id in taken:
                raise InputError(f"image id {image_id!r} would name both {taken[image_id]} and {path}; "
                                 "rename one of the files or use relative paths as ids in the ratings table")
            taken[image_id] = path
        analysable = table["image_id"].isin(list(report.matched)) & np.isfinite(table[rating_column])
        table = table[analysable].reset_index(drop=True)
    ordered = {ids[p]: str(p) for p in files}  # strings: a Path per image costs ~0.5 KB for the whole run
    description = {"kind": "folder", "images": str(root.resolve()), "n_images": len(files),
                   "n_unreadable": len(unreadable),
                   "ratings": str(Path(ratings).resolve()) if ratings is not None else None,
                   "id_column": id_column, "rating_column": rating_column}
    return Stimuli(lambda pre: FolderSource(root, ordered, pre), table, rating_column, report, description,
                   unreadable)


def embedded(n: int = demo.DEFAULT_N, seed: int = demo.DEFAULT_SEED) -> Stimuli:
    """The embedded default: generated images with synthetic ratings (see :mod:`fluency.core.inputs.demo`)."""
    images, table = demo.generate(n, demo.DEFAULT_SIZE, seed)
    tensor = demo.as_tensor(images)
    description = {"kind": "embedded", "generator": "fluency.core.inputs.demo", "n_images": n, "seed": seed,
                   "size": demo.DEFAULT_SIZE, "rating_column": "rating"}

    def make_source(pre: Preprocessing) -> ImageSource:
        size = demo.DEFAULT_SIZE if pre.size is None else pre.size
        if (pre.channels, size) != (3, demo.DEFAULT_SIZE):
            data = tensor if pre.size is None else torch.nn.functional.interpolate(  # native: as generated
                tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            data = data.mean(dim=1, keepdim=True) if pre.channels == 1 else data
        else:
            data = tensor
        return TensorSource(list(table["image_id"]), data, description)

    return Stimuli(make_source, table, "rating", None, description)
