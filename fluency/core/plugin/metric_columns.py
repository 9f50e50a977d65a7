"""The metric table held per output: the image ids once, one float64 column per (checkpoint, metric, layer).

The long metric table repeats ``image_id``, ``checkpoint``, ``metric`` and ``layer`` on every row:
in pandas that is ~140 bytes per value, and a run of 100,000 images with 21 outputs would hold
~300 MB for it before an analysis makes its first copy. Analyses and the report only ever read one
output, one metric's layers, or one output under every checkpoint at a time, so a run holds the table
as positions into one array of image ids plus one value array per output (12 bytes per value) and
builds each slice when it is asked for (:meth:`MetricColumns.rows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

#: ``(checkpoint, metric, layer)``; ``layer`` None for a whole-model metric
Output = tuple[str, str, "str | None"]
#: the long table's columns, in order
LONG_COLUMNS = ("image_id", "checkpoint", "metric", "layer", "value")
_FIELDS = {"checkpoint": 0, "metric": 1, "layer": 2}


def output_order(key: Sequence[str | None]) -> tuple[Any, ...]:
    """Sort key of ``(checkpoint, metric, layer)`` tuples or any prefix/suffix of them: strings in order, a
    missing layer (None) after every named one, as pandas' ``groupby(..., sort=True, dropna=False)`` does."""
    return tuple((v is None, "" if v is None else str(v)) for v in key)


class MetricColumns:
    """Every output's values as ``(positions into ids, float64 values)``, in the table's order."""

    def __init__(self, ids: np.ndarray, outputs: Mapping[Output, tuple[np.ndarray, np.ndarray]]) -> None:
        self.ids = ids
        self._outputs = dict(outputs)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_long(cls, table: pd.DataFrame) -> MetricColumns:
        """From a long table with at least :data:`LONG_COLUMNS` (other columns are dropped)."""
        builder = ColumnsBuilder()
        if len(table):
            builder.add(*(table[c].astype(str).to_numpy(object) for c in ("image_id", "checkpoint", "metric")),
                        table["layer"].astype(object).where(table["layer"].notna(), None).to_numpy(object),
                        table["value"].to_numpy(float))
        return builder.build()

    # -- reading --------------------------------------------------------------------------------

    def outputs(self) -> list[Output]:
        """Every output, in the order it first appears in the table."""
        return list(self._outputs)

    def values(self, output: Output) -> pd.Series:
        """One output's values indexed by ``image_id``, in the table's order."""
        positions, values = self._outputs[output]
        return pd.Series(values, index=pd.Index(self.ids[positions], name="image_id"), name="value")

    def n_rows(self) -> int:
        """The number of values (rows of the long table)."""
        return sum(len(v) for _, v in self._outputs.values())

    def image_ids(self) -> np.ndarray:
        """The distinct image ids that have at least one value."""
        used = np.zeros(len(self.ids), bool)
        for positions, _ in self._outputs.values():
            used[positions] = True
        return self.ids[used]

    def rows(self, **where: str | None) -> pd.DataFrame:
        """The long rows (:data:`LONG_COLUMNS`) of the outputs whose fields equal ``where`` (``checkpoint``,
        ``metric``, ``layer``; ``layer=None``: whole-model outputs), one output after another."""
        unknown = set(where) - set(_FIELDS)
        if unknown:
            raise TypeError(f"rows(): unknown field(s) {sorted(unknown)}; use {list(_FIELDS)}")
        chosen = [k for k in self._outputs if all(k[_FIELDS[f]] == v for f, v in where.items())]
        if not chosen:
            return pd.DataFrame({c: pd.Series(dtype=float if c == "value" else object) for c in LONG_COLUMNS})
        sizes = [len(self._outputs[k][0]) for k in chosen]
        return pd.DataFrame({
            "image_id": self.ids[np.concatenate([self._outputs[k][0] for k in chosen])],
            **{f: np.repeat(np.array([k[i] for k in chosen], dtype=object), sizes) for f, i in _FIELDS.items()},
            "value": np.concatenate([self._outputs[k][1] for k in chosen])})

    def wide(self, outputs: Sequence[Output]) -> pd.DataFrame:
        """Images × ``outputs`` (the first value of an image where one repeats; NaN where one is missing), rows
        in the order of :attr:`ids`, images without any of these values left out."""
        columns = np.full((len(self.ids), len(outputs)), np.nan)
        seen = np.zeros(len(self.ids), bool)
        for j, key in enumerate(outputs):
            positions, values = self._outputs[key]
            first = _first_positions(positions)
            columns[positions[first], j] = values[first]
            seen[positions] = True
        return pd.DataFrame(columns[seen], index=pd.Index(self.ids[seen], name="image_id"))

    def to_long(self) -> pd.DataFrame:
        """The long table (:data:`LONG_COLUMNS`), output after output."""
        return self.rows()

    # -- deriving -------------------------------------------------------------------------------

    def restrict(self, image_ids: Iterable[str]) -> MetricColumns:
        """Only the values of ``image_ids`` (self when every value is of one of them)."""
        keep = pd.Index(self.ids).isin(list(image_ids))
        if keep.all():
            return self
        return MetricColumns(self.ids, {k: (p[keep[p]], v[keep[p]]) for k, (p, v) in self._outputs.items()})

    def select(self, outputs: Iterable[Output]) -> MetricColumns:
        """Only ``outputs`` (in the table's order)."""
        wanted = set(outputs)
        return MetricColumns(self.ids, {k: pv for k, pv in self._outputs.items() if k in wanted})


def as_columns(table: pd.DataFrame | MetricColumns) -> MetricColumns:
    """``table`` as :class:`MetricColumns` (a long DataFrame is converted)."""
    return table if isinstance(table, MetricColumns) else MetricColumns.from_long(table)


def _first_positions(positions: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each position, in order."""
    _, first = np.unique(positions, return_index=True)
    return np.sort(first) if len(first) != len(positions) else np.arange(len(positions))


class ColumnsBuilder:
    """Collects batches of long rows into :class:`MetricColumns`, holding only the compact form."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._parts: dict[Output, tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def add(self, image_ids: np.ndarray, checkpoints: np.ndarray, metrics: np.ndarray, layers: np.ndarray,
            values: np.ndarray) -> None:
        """Append rows given as equal-length arrays (``layers`` None for whole-model rows)."""
        positions = self.positions(image_ids)
        code = np.zeros(len(positions), np.int64)
        levels = []
        for field in (checkpoints, metrics, layers):
            codes, uniques = pd.factorize(pd.Series(field, dtype=object), sort=False, use_na_sentinel=False)
            code = code * (len(uniques) + 1) + codes
            levels.append((codes, uniques))
        _, first = np.unique(code, return_index=True)
        for row in np.sort(first):
            rows = code == code[row]
            key = tuple(uniques[codes[row]] for codes, uniques in levels)
            self.add_output(_key(key), positions[rows], values[rows])

    def positions(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Each id's position in the collected ids (new ids appended)."""
        codes, uniques = pd.factorize(np.asarray(image_ids, dtype=object), sort=False)
        mapped = np.array([self._ids.setdefault(str(i), len(self._ids)) for i in uniques], dtype=np.int32)
        return mapped[codes] if len(codes) else np.empty(0, np.int32)

    def add_output(self, key: Output, positions: np.ndarray, values: np.ndarray) -> None:
        """Append one output's values at already mapped ``positions``."""
        part = self._parts.setdefault(key, ([], []))
        part[0].append(np.asarray(positions, np.int32))
        part[1].append(np.asarray(values, np.float64))

    def build(self) -> MetricColumns:
        ids = np.array(list(self._ids), dtype=object)
        outputs = {}
        while self._parts:  # one output's parts freed as it is joined: never two copies of every column
            key = next(iter(self._parts))
            positions, values = self._parts.pop(key)
            outputs[key] = (np.concatenate(positions), np.concatenate(values))
        return MetricColumns(ids, outputs)


def _key(key: tuple[Any, ...]) -> Output:
    layer = key[2]
    return str(key[0]), str(key[1]), None if layer is None or pd.isna(layer) else str(layer)
