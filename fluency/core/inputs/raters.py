"""Reading a table of per-rater ratings (``--rater-ratings``): who rated which image how.

Two layouts, told apart by their columns:

* **long**: one row per rating, with the image id column (``--id-column``, default ``image_id``), a rater
  column (``--rater-column``, default ``rater``) and a rating column (``--rating-column`` if the table has
  it, else ``rating``). A rater who rated one image twice is an error.
* **wide**: one row per rater, one column per image, named by the image's id (as the ratings table names
  it), e.g. the London set's ``ratings_raw.csv``: ``rater_sex,rater_sexpref,rater_age,X001,X002,...``.
  Columns that name no analysed image (rater descriptors such as ``rater_age``) are ignored and listed; a
  ``--rater-column`` column, if present, names the raters.

A table with the id column is long, else wide. Only the images a run analyses count (the rated images of
``--ratings``): ids of other images are ignored and listed. Empty cells are ratings not given (NaN).

Errors (:class:`InputError`, one message naming the file, rows and columns): a cell that is not a number or is
infinite; a long table without its rater or rating column; a table none of whose ids or columns names an
analysed image; fewer than 2 raters or 3 images with ratings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fluency.core.errors import InputError
from fluency.core.inputs.ratings import _id_text, _listing, _rating_value, first_row, normalise_id, read_table

LAYOUTS = ("long", "wide")


@dataclass(frozen=True)
class RaterRatings:
    """Per-rater ratings as a ``raters`` × ``image_ids`` matrix ``values`` (NaN: not rated).

    ``image_ids`` are the run's ids (as the ratings table spells them), in the run's order, only those with at
    least one rating; ``unmatched`` lists ids (long) or columns (wide) of the table that name no analysed
    image; ``unrated`` the analysed images the table has no rating of.
    """

    path: Path
    layout: str
    image_ids: list[str]
    raters: list[str]
    values: np.ndarray
    unmatched: list[str] = field(default_factory=list)
    unrated: list[str] = field(default_factory=list)

    def subset(self, image_ids: Sequence[str]) -> np.ndarray:
        """The matrix restricted to ``image_ids`` (those it has; in its own order)."""
        wanted = set(image_ids)
        return self.values[:, [i for i, image_id in enumerate(self.image_ids) if image_id in wanted]]

    def mean_ratings(self) -> pd.Series:
        """The mean rating of each image over the raters who rated it."""
        return pd.Series(np.nanmean(self.values, axis=0), index=self.image_ids)

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for the manifest."""
        return {"path": str(self.path.resolve()), "layout": self.layout, "n_raters": len(self.raters),
                "n_images": len(self.image_ids), "n_ratings": int(np.isfinite(self.values).sum()),
                "unmatched": list(self.unmatched), "unrated_images": list(self.unrated)}


def _numbers(cells: Sequence[Any], path: Path, where: str, rows: Sequence[int]) -> np.ndarray:
    """Ratings as floats (NaN where empty); text that is not a number, or an infinite value, is an error naming
    ``where`` (a column) and the rows."""
    values = [_rating_value(v) for v in cells]
    bad = [f"row {row}: {cell!r}" for row, cell, v in zip(rows, cells, values)
           if v is None or math.isinf(v)]
    if bad:
        raise InputError(f"rater ratings {path}: {where} has values that are not finite numbers (write decimals "
                         f"with a point, leave missing ratings empty): {_listing(bad, 5)}")
    return np.asarray(values, dtype=float)


def read_rater_ratings(path: str | Path, image_ids: Sequence[str], id_column: str = "image_id",
                       rater_column: str = "rater", rating_column: str = "rating") -> RaterRatings:
    """Read a long or wide per-rater table (see the module docstring) for the analysed ``image_ids``."""
    path = Path(path)
    table = read_table(path)
    if not len(table):
        raise InputError(f"rater ratings {path} has no rows")
    ids = {normalise_id(i): str(i) for i in image_ids}
    first = first_row(path)
    rows = range(first, first + len(table))
    if id_column in table.columns:
        layout, raters, columns, values, unmatched = "long", *_long(table, path, ids, id_column, rater_column,
                                                                    rating_column, rows)
    else:
        layout, raters, columns, values, unmatched = "wide", *_wide(table, path, ids, rater_column, rows)
    rated = np.isfinite(values)
    keep_raters, keep_images = rated.any(axis=1), rated.any(axis=0)
    values = values[keep_raters][:, keep_images]
    raters = [r for r, keep in zip(raters, keep_raters) if keep]
    columns = [c for c, keep in zip(columns, keep_images) if keep]
    if len(raters) < 2 or len(columns) < 3:
        raise InputError(f"rater ratings {path}: {len(raters)} rater(s) rated {len(columns)} of the analysed "
                         "images; a reliability needs at least 2 raters and 3 images")
    order = {image_id: i for i, image_id in enumerate(image_ids)}
    sort = sorted(range(len(columns)), key=lambda j: order[columns[j]])
    columns = [columns[j] for j in sort]
    unrated = [str(i) for i in image_ids if str(i) not in set(columns)]
    return RaterRatings(path, layout, columns, raters, values[:, sort], unmatched, unrated)


def _no_match(path: Path, what: str, found: Sequence[str], ids: dict[str, str]) -> InputError:
    return InputError(f"rater ratings {path}: no {what} names an analysed image: {what}s look like "
                      f"{_listing([repr(v) for v in found], 3)}, image ids like "
                      f"{_listing([repr(v) for v in list(ids.values())], 3)}")


def _wide(table: pd.DataFrame, path: Path, ids: dict[str, str], rater_column: str,
          rows: Sequence[int]) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """Raters, image ids, the raters × images matrix and the ignored columns of a wide table."""
    image_columns = [c for c in table.columns if normalise_id(c) in ids and c != rater_column]
    if not image_columns:
        raise _no_match(path, "column", list(table.columns), ids)
    seen: dict[str, str] = {}
    for c in image_columns:
        if ids[normalise_id(c)] in seen:
            raise InputError(f"rater ratings {path}: columns {seen[ids[normalise_id(c)]]!r} and {c!r} name one "
                             "image; keep one column per image")
        seen[ids[normalise_id(c)]] = c
    values = np.column_stack([_numbers(list(table[c]), path, f"column {c!r}", rows) for c in image_columns])
    raters = ([_id_text(v) or f"row {row}" for v, row in zip(table[rater_column], rows)]
              if rater_column in table.columns else [f"row {row}" for row in rows])
    ignored = [str(c) for c in table.columns if c not in image_columns and c != rater_column]
    return raters, [ids[normalise_id(c)] for c in image_columns], values, ignored


def _long(table: pd.DataFrame, path: Path, ids: dict[str, str], id_column: str, rater_column: str,
          rating_column: str, rows: Sequence[int]) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """Raters, image ids, the raters × images matrix and the unmatched ids of a long table."""
    value_column = rating_column if rating_column in table.columns else "rating"
    missing = [c for c in (rater_column, value_column) if c not in table.columns]
    if missing:
        raise InputError(f"rater ratings {path}: a long table (it has the id column {id_column!r}) needs a rater "
                         f"column and a rating column; it has no {' or '.join(repr(c) for c in missing)} (its "
                         f"columns: {_listing([repr(c) for c in table.columns], 20)}); name them with "
                         "--rater-column and --rating-column")
    image = [_id_text(v) for v in table[id_column]]
    rater = [_id_text(v) for v in table[rater_column]]
    empty = [str(row) for row, i, r in zip(rows, image, rater) if not i or not r]
    if empty:
        raise InputError(f"rater ratings {path}: empty image id or rater in row(s) {_listing(empty)}")
    keep = [j for j, i in enumerate(image) if normalise_id(i) in ids]
    unmatched = list(dict.fromkeys(i for i in image if normalise_id(i) not in ids))
    if not keep:
        raise _no_match(path, "id", unmatched, ids)
    values = _numbers([table[value_column].iloc[j] for j in keep], path, f"column {value_column!r}",
                      [rows[j] for j in keep])
    images = list(dict.fromkeys(ids[normalise_id(image[j])] for j in keep))
    raters = list(dict.fromkeys(rater[j] for j in keep))
    col = {image_id: c for c, image_id in enumerate(images)}
    row_of = {r: i for i, r in enumerate(raters)}
    matrix = np.full((len(raters), len(images)), np.nan)
    first_seen: dict[tuple[int, int], int] = {}
    twice: list[str] = []
    for j, value in zip(keep, values):
        cell = (row_of[rater[j]], col[ids[normalise_id(image[j])]])
        if cell in first_seen:
            twice.append(f"rater {rater[j]!r} rated {image[j]!r} in rows {first_seen[cell]} and {rows[j]}")
            continue
        first_seen[cell] = rows[j]
        matrix[cell] = value
    if twice:
        raise InputError(f"rater ratings {path}: {_listing(twice, 5)}; keep one rating per rater and image")
    return raters, images, matrix, unmatched

