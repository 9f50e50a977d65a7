"""Reading a ratings table and matching its ids to image files.

A ratings table (CSV/TSV or Parquet) has one row per image: an id column, a
rating column and any other columns (grouping variables such as sex or
ethnicity, covariates). Ids are text: ``1`` names ``1.jpg`` and ``007`` stays
``007``. They may be file stems, or paths relative to the image folder with or
without the extension; :func:`match_ids` finds which form the table uses.

Policy. Problems that make the table unusable are errors (:class:`InputError`,
naming the file, the column, the rows as numbered in the file and the values):

* a missing id or rating column;
* empty ids; two rows naming one image: the same id twice, ids equal under the matching rules
  (``./a`` and ``a``, ``a\\b`` and ``a/b``), or, once the images are known (:func:`match_ids`), ids
  of two forms naming one file (``img01`` and ``img01.png``);
* ratings that are not numbers (``abc``, ``5,5``) or infinite (``inf``, ``1e999``, ``-Infinity``).

Mismatches are reported (:class:`MatchReport`) and the run goes on; with
``--strict`` the CLI turns any of them into an error (:func:`check_strict`):

* rated ids without an image are left out of the analyses;
* images without a rating get metrics but are left out of the analyses;
* an id that names several files (one stem in several folders, or one name
  with several extensions) is left out, never resolved by guessing;
* empty ratings (an empty cell, ``NA``, ``NaN``, ``null``…) are kept as NaN and
  left out of the analyses;
* images that cannot be decoded are left out of metrics and analyses
  (:meth:`MatchReport.drop_unreadable`).

A table none of whose ids names an image is an error (:func:`check_any_matched`):
it almost always means the ids are of another form or the id column is wrong.
"""

from __future__ import annotations

import difflib
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from fluency.core.errors import InputError
from fluency.core.inputs.paths import PathMap

CSV_EXTENSIONS = (".csv", ".tsv", ".txt")
PARQUET_EXTENSIONS = (".parquet", ".pq")
#: cell texts that mean "no value" (pandas' defaults)
MISSING_TEXTS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                           "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
MODES = ("relpath", "relpath-noext", "stem")

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INFINITY = re.compile(r"[+-]?inf(?:inity)?", re.IGNORECASE)
_LISTED = 10


def _listing(items: Sequence[str], limit: int = _LISTED) -> str:
    """``a, b, c`` or ``a, …, j and 5 more``."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def first_row(path: str | Path) -> int:
    """The row number of the table's first record as the user sees it: 2 under a CSV header, 1 in Parquet."""
    return 1 if Path(path).suffix.lower() in PARQUET_EXTENSIONS else 2


def _delimiter(header: str, ext: str) -> str:
    """The separator of a text table, from its header line: the most frequent of ',', tab and ';'."""
    if ext == ".tsv":
        return "\t"
    counts = {sep: header.count(sep) for sep in (",", "\t", ";")}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV/TSV (``.csv``, ``.tsv``, ``.txt``) or Parquet (``.parquet``, ``.pq``) table, by extension.

    Text tables come back as text exactly as written (empty cells as ``''``) so
    that no id is turned into a number; the separator (',', tab or ';') is taken
    from the header line and UTF-8 (with or without BOM) is expected, with
    Windows-1252 as a fallback. Parquet columns keep their types. Column names are
    stripped of surrounding spaces.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if not path.exists():
        raise InputError(f"ratings table {path} does not exist")
    if not path.is_file():
        raise InputError(f"ratings table {path} is not a file")
    if ext in PARQUET_EXTENSIONS:
        try:
            table = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises its own error types
            raise InputError(f"cannot read Parquet table {path}: {exc}") from exc
    elif ext in CSV_EXTENSIONS:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read ratings table {path}: {exc}") from exc
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError as exc:
                raise InputError(f"cannot read ratings table {path}: it is neither UTF-8 nor Windows-1252 "
                                 "text; save it as UTF-8") from exc
        header = next((line for line in text.splitlines() if line.strip()), "")
        if not header:
            raise InputError(f"ratings table {path} is empty")
        try:
            table = pd.read_csv(io.StringIO(text), sep=_delimiter(header, ext), dtype=str,
                                keep_default_na=False, na_filter=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            raise InputError(f"cannot parse ratings table {path}: {exc}") from exc
    else:
        raise InputError(f"ratings table {path}: unknown extension {path.suffix!r}; use CSV "
                         f"({', '.join(CSV_EXTENSIONS)}) or Parquet ({', '.join(PARQUET_EXTENSIONS)})")
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _id_text(value: Any) -> str:
    """An id cell as stripped text; integral numbers (from Parquet) without a decimal point; missing as ''."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if float(value).is_integer():
            return str(int(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip()


def _rating_value(value: Any) -> float | None:
    """A rating cell as a float (NaN when empty, ±inf when infinite, ``1e999`` included), or None when it is not
    a number."""
    if value is None or value is pd.NA:
        return math.nan
    if isinstance(value, str):
        text = value.strip()
        if text in MISSING_TEXTS:
            return math.nan
        return float(text) if _NUMBER.fullmatch(text) or _INFINITY.fullmatch(text) else None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _infer(column: pd.Series) -> pd.Series:
    """A text column as numbers when every non-missing cell is one, else as text with NaN for missing cells."""
    text = column.astype(str)
    missing = text.str.strip().isin(MISSING_TEXTS)
    try:
        return pd.to_numeric(text.where(~missing, None))
    except (TypeError, ValueError):
        return column.where(~missing, np.nan)


def _require_column(table: pd.DataFrame, name: str, role: str, path: Path) -> None:
    if name in table.columns:
        return
    columns = [str(c) for c in table.columns]
    lowered = {c.lower(): c for c in columns}
    close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)]
    option = f"--{role}-column"
    if close:
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}? (pass {option} {close[0]})"
    else:
        hint = f"; pass {option} NAME to say which column holds the {role if role == 'rating' else 'image ids'}"
    raise InputError(f"ratings table {path} has no {role} column {name!r}; its columns are "
                     f"{_listing([repr(c) for c in columns], 30)}{hint}")


def read_ratings(path: str | Path, id_column: str = "image_id", rating_column: str = "rating") -> pd.DataFrame:
    """The ratings table with ``image_id`` (stripped text), ``rating_column`` (float; NaN where empty), then the rest.

    Other columns are kept: from text tables as numbers where every non-empty cell
    is a number, else as text. If the id column is not ``image_id`` and the table
    also has an ``image_id`` column, that one is kept as ``original_image_id``.
    Raises :class:`InputError` for the errors listed in the module docstring, all
    of them at once.
    """
    path = Path(path)
    table = read_table(path)
    if id_column == rating_column:
        raise InputError(f"ratings table {path}: the id and the rating column are both {id_column!r}")
    _require_column(table, id_column, "id", path)
    _require_column(table, rating_column, "rating", path)
    if rating_column == "image_id":
        raise InputError(f"ratings table {path}: the rating column cannot be called 'image_id' "
                         f"(that name is for ids); rename it")
    first = first_row(path)
    is_text = path.suffix.lower() in CSV_EXTENSIONS
    problems: list[str] = []

    ids = [_id_text(v) for v in table[id_column]]
    empty = [first + i for i, v in enumerate(ids) if not v]
    if empty:
        problems.append(f"column {id_column!r} has empty ids in "
                        f"row{'s' if len(empty) > 1 else ''} {_listing([str(r) for r in empty])}")
    rows: dict[str, list[tuple[int, str]]] = {}
    for i, v in enumerate(ids):
        if v:
            rows.setdefault(normalise_id(v), []).append((first + i, v))
    duplicates = [_rows_text(found) for found in rows.values() if len(found) > 1]
    if duplicates:
        problems.append(f"column {id_column!r} has duplicate ids (rows naming one image; keep one row per "
                        f"image): {_listing(duplicates)}")

    values = [_rating_value(v) for v in table[rating_column]]
    cells = table[rating_column]
    bad = [f"row {first + i}: {cells.iloc[i]!r}" for i, v in enumerate(values) if v is None]
    if bad:
        problems.append(f"column {rating_column!r} has values that are not numbers (write decimals with a "
                        f"point, leave missing ratings empty): {_listing(bad)}")
    infinite = [f"row {first + i}: {cells.iloc[i]!r}" for i, v in enumerate(values)
                if v is not None and math.isinf(v)]
    if infinite:
        problems.append(f"column {rating_column!r} has infinite values (a rating is a finite number): "
                        f"{_listing(infinite)}")
    if problems:
        raise InputError(f"ratings table {path}: " + "\n  ".join(problems))

    others = [c for c in table.columns if c not in (id_column, rating_column)]
    out = pd.DataFrame({"image_id": pd.Series(ids, dtype=object),
                        rating_column: pd.Series(values, dtype=np.float64)})
    for column in others:
        name = "original_image_id" if column == "image_id" else column
        out[name] = _infer(table[column]).to_numpy() if is_text else table[column].to_numpy()
    return out


def _rows_text(found: Sequence[tuple[int, str]]) -> str:
    """``'a' (rows 2, 4)`` for one id repeated, ``'./a' (row 2) and 'a' (row 4)`` for two spellings of one."""
    if len({image_id for _, image_id in found}) == 1:
        return f"{found[0][1]!r} (rows {', '.join(str(row) for row, _ in found)})"
    return " and ".join(f"{image_id!r} (row {row})" for row, image_id in found)


def empty_rating_ids(table: pd.DataFrame, rating_column: str = "rating") -> list[str]:
    """The ids of a :func:`read_ratings` table whose rating is empty (NaN), in table order."""
    return [str(v) for v in table.loc[table[rating_column].isna(), "image_id"]]


@dataclass
class MatchReport:
    """How a ratings table's ids matched the image files, and what did not (see the module docstring).

    ``matched`` maps ids (as in the table, in table order) to files (a dict-like
    :class:`~fluency.core.inputs.paths.PathMap`: paths kept as strings); ``missing_images``
    lists rated ids without a file; ``unrated_images`` the relative paths of images
    without a row (those in ``ambiguous`` are listed there only); ``ambiguous`` maps
    an id that names several files to their relative paths; ``empty_ratings`` lists
    the ids whose rating is empty; ``unreadable_images`` maps the relative paths of
    files that cannot be decoded to the decoder's reason and ``unreadable_ids`` lists
    the rated ids of those files (neither is in ``matched`` nor ``unrated_images``).
    """

    mode: str
    matched: MutableMapping[str, Path] = field(default_factory=PathMap)
    missing_images: list[str] = field(default_factory=list)
    unrated_images: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    empty_ratings: list[str] = field(default_factory=list)
    unreadable_images: dict[str, str] = field(default_factory=dict)
    unreadable_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every rated id names exactly one readable image, every image is rated and no rating is empty."""
        return not (self.missing_images or self.unrated_images or self.ambiguous or self.empty_ratings
                    or self.unreadable_images)

    def drop_unreadable(self, root: str | Path, problems: Mapping[Path, str]) -> None:
        """Move the files in ``problems`` (path → reason) out of ``matched`` and ``unrated_images``."""
        if not problems:
            return
        rels = {_relpath(Path(p), Path(root)): why for p, why in problems.items()}
        self.unreadable_images.update(rels)
        for image_id, path in list(self.matched.items()):
            if _relpath(Path(path), Path(root)) in rels:
                del self.matched[image_id]
                self.unreadable_ids.append(image_id)
        self.unrated_images = [rel for rel in self.unrated_images if rel not in rels]

    def summary_lines(self) -> list[str]:
        """The outcome in a few human-readable lines, the problems with examples."""
        n_ids = len(self.matched) + len(self.missing_images) + len(self.ambiguous) + len(self.unreadable_ids)
        image = "a readable image" if self.unreadable_ids else "an image"
        lines = [f"{len(self.matched)} of {n_ids} rated ids matched {image} "
                 f"(ids read as {_MODE_WORDS[self.mode]})"]
        if self.missing_images:
            lines.append(f"{len(self.missing_images)} rated ids have no image and are left out: "
                         f"{_listing([repr(i) for i in self.missing_images])}")
        if self.ambiguous:
            items = [f"{k!r} → {', '.join(v)}" for k, v in self.ambiguous.items()]
            lines.append(f"{len(self.ambiguous)} rated ids name several images and are left out "
                         f"(use paths relative to the image folder as ids): {_listing(items, 5)}")
        if self.unreadable_images:
            items = [f"{rel} ({why})" for rel, why in self.unreadable_images.items()]
            lines.append(f"{len(self.unreadable_images)} images cannot be read and are left out of metrics and "
                         f"analyses: {_listing(items, 5)}")
        if self.unrated_images:
            lines.append(f"{len(self.unrated_images)} images have no rating (metrics only, left out of the "
                         f"analyses): {_listing(self.unrated_images)}")
        if self.empty_ratings:
            lines.append(f"{len(self.empty_ratings)} rows have an empty rating and are left out of the "
                         f"analyses: {_listing([repr(i) for i in self.empty_ratings])}")
        if not self.matched and self.missing_images and self.unrated_images:
            lines.append(f"no id matched: ids look like {self.missing_images[0]!r}, images like "
                         f"{self.unrated_images[0]!r}; ids must be file names without extension or paths "
                         "relative to the image folder (with or without extension), case as in the file names")
        return lines

    def as_dict(self) -> dict[str, Any]:
        """The report, JSON-ready (paths as strings)."""
        return {"mode": self.mode, "ok": self.ok, "n_matched": len(self.matched),
                "matched": (self.matched.names() if isinstance(self.matched, PathMap)  # the same strings, not copies
                            else {k: os.fspath(v) for k, v in self.matched.items()}),
                "missing_images": list(self.missing_images), "unrated_images": list(self.unrated_images),
                "ambiguous": {k: list(v) for k, v in self.ambiguous.items()},
                "empty_ratings": list(self.empty_ratings),
                "unreadable_images": dict(self.unreadable_images), "unreadable_ids": list(self.unreadable_ids)}


_MODE_WORDS = {"relpath": "paths relative to the image folder", "relpath-noext":
               "paths relative to the image folder without extension", "stem": "file names without extension"}


def normalise_id(image_id: str) -> str:
    """An id as compared with file paths: stripped, '\\' as '/', without leading './'."""
    text = str(image_id).strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def _key(relpath: str, mode: str) -> str:
    if mode == "relpath":
        return relpath
    pure = PurePosixPath(relpath)
    return pure.stem if mode == "stem" else pure.with_suffix("").as_posix()


def _index(rels: Sequence[str], mode: str) -> dict[str, list[int]]:
    """Key of each file under one reading of the ids → the indices of the files with that key."""
    index: dict[str, list[int]] = {}
    for i, rel in enumerate(rels):
        index.setdefault(_key(rel, mode), []).append(i)
    return index


def _match(ids: Sequence[str], rels: Sequence[str], index: Mapping[str, list[int]]) -> tuple[
        dict[str, int], list[str], dict[str, list[str]]]:
    """``(id -> file index, missing ids, ambiguous {id: relpaths})`` for one reading of the ids."""
    matched: dict[str, int] = {}
    missing: list[str] = []
    ambiguous: dict[str, list[str]] = {}
    for image_id in ids:
        hits = index.get(normalise_id(image_id), [])
        if len(hits) == 1:
            matched[image_id] = hits[0]
        elif hits:
            ambiguous[image_id] = [rels[i] for i in hits]
        else:
            missing.append(image_id)
    return matched, missing, ambiguous


def _check_one_row_per_image(ids: Sequence[str], rels: Sequence[str], indexes: Iterable[Mapping[str, list[int]]],
                             rows: Sequence[int] | None, source: str | Path | None) -> None:
    """Raise :class:`InputError` when two different ids name one file under any reading (``img01`` and
    ``img01.png``, ``./a`` and ``a``): one image rated in two rows, which no choice of reading can settle.
    An id repeated exactly is :func:`read_ratings`' error, not this one."""
    named: dict[int, dict[str, int]] = {}  # file index -> {id: its position in ids}
    for position, image_id in enumerate(ids):
        key = normalise_id(image_id)
        for index in indexes:
            hits = index.get(key, [])
            if len(hits) == 1:
                named.setdefault(hits[0], {}).setdefault(image_id, position)
    clashes = [(i, found) for i, found in named.items() if len(found) > 1]
    if not clashes:
        return
    if rows is None:
        i, found = clashes[0]
        raise InputError(f"rated ids {' and '.join(map(repr, found))} both name the image {rels[i]}")
    items = [f"{' and '.join(f'row {rows[p]} ({image_id!r})' for image_id, p in found.items())} both name the "
             f"image {rels[i]}" for i, found in clashes]
    raise InputError(f"ratings table {source}: {_listing(items, 5)}; keep one row per image")


def _relpath(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def match_ids(ids: Sequence[str], root: str | Path, files: Sequence[Path], empty_ratings: Iterable[str] = (), *,
              rows: Sequence[int] | None = None, source: str | Path | None = None) -> MatchReport:
    """Match rated ``ids`` to ``files`` (under ``root``), reading the ids in the form that matches most.

    Each reading (relative path, relative path without extension, stem) is tried;
    the one under which most ids name a file, uniquely or not, wins, then the one
    with most unique matches; ties prefer relpath, then relpath-noext, then stem.
    Where no id that relpath-noext matches has a folder part it reads exactly as
    stem, and is reported as stem. ``empty_ratings`` (ids whose rating is empty)
    is passed through to the report. Two ids naming one file under any reading
    (``img01`` and ``img01.png``) raise :class:`InputError`, naming the rows of the
    table ``source`` when ``rows`` (each id's row number as the user sees it) is given.
    """
    root = Path(root)
    ids = [str(i) for i in ids]
    rels = [_relpath(Path(p), root) for p in files]
    indexes = {mode: _index(rels, mode) for mode in MODES}
    _check_one_row_per_image(ids, rels, indexes.values(), rows, source)
    best: tuple[tuple[int, int, int], str, Any] | None = None
    for priority, mode in zip((3, 2, 1), MODES):
        result = _match(ids, rels, indexes[mode])
        matched, _, ambiguous = result
        if mode == "relpath-noext" and not any("/" in normalise_id(i) for i in [*matched, *ambiguous]):
            priority = 0  # the same reading as stem
        score = (len(matched) + len(ambiguous), len(matched), priority)
        if best is None or score > best[0]:
            best = (score, mode, result)
    assert best is not None
    _, mode, (matched, missing, ambiguous) = best

    owners = {i: image_id for image_id, i in matched.items()}  # one id per file: checked above
    in_ambiguous = {rel for paths in ambiguous.values() for rel in paths}
    unrated = [rel for i, rel in enumerate(rels) if i not in owners and rel not in in_ambiguous]
    return MatchReport(mode=mode, matched=PathMap((k, files[i]) for k, i in matched.items()),
                       missing_images=missing, unrated_images=unrated, ambiguous=ambiguous,
                       empty_ratings=[str(i) for i in empty_ratings])


def check_any_matched(report: MatchReport, path: str | Path, id_column: str = "image_id") -> None:
    """Raise :class:`InputError` when no rated id names a readable image, with examples of both and what to check."""
    if report.matched or report.ambiguous:
        return
    if report.unreadable_ids:
        raise InputError(f"ratings table {path}: every image its ids name cannot be read, e.g. "
                         + "; ".join(f"{rel} ({why})" for rel, why in list(report.unreadable_images.items())[:3]))
    if not report.missing_images:
        raise InputError(f"ratings table {path} has no rows")
    ids = report.missing_images
    images = report.unrated_images or list(report.unreadable_images)
    folded = {_key(rel, mode).lower() for rel in images for mode in MODES}
    case = ("; they would match if case were ignored: write them in the file names' case"
            if any(normalise_id(i).lower() in folded for i in ids) else "")
    raise InputError(
        f"no rated id in column {id_column!r} of {path} names an image: ids look like "
        f"{_listing([repr(i) for i in ids], 3)}; images like {_listing(images, 3)}{case}. Ids must be file "
        "names without extension (stems, e.g. 'X001') or paths relative to the image folder, with or without "
        "extension (e.g. 'women/X001.jpg'); check that --id-column names the column of image ids")


def check_strict(report: MatchReport, path: str | Path) -> None:
    """Raise :class:`InputError` listing every mismatch between the table at ``path`` and the images."""
    if report.ok:
        return
    raise InputError(f"--strict: the ratings table {path} and the images do not match:\n  "
                     + "\n  ".join(report.summary_lines()))
