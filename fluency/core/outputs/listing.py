"""Tables of runs and of query results for the terminal (fitted to its width), CSV and JSON.

A table keeps the compact style of the run summary (no borders, two spaces between columns) and fits
the terminal: one space between columns if need be, then the widest text column is narrowed first,
and a value that does not fit ends in ``…`` (run folders are cut where they differ, so that two never read alike). Numbers and dates are
not cut unless nothing else is left to narrow.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from fluency.core.outputs.summary import short_names
from fluency.core.run.history import RunInfo, started_at
from fluency.core.run.sql import QueryResult

#: spaces between columns
GAP = 2
#: a column holding text is not narrowed below this (its header may be cut)
MIN_TEXT_WIDTH = 8
#: checkpoints named one by one up to this many, else counted
MAX_LABELS = 3


def fit_widths(natural: Sequence[int], minimum: Sequence[int], width: int, gap: int = GAP) -> list[int]:
    """Column widths no wider than ``natural`` whose sum with the gaps fits ``width``: the widest column
    above its ``minimum`` loses a character at a time. Where the minimums do not fit, they are kept."""
    widths = list(natural)
    floor = [min(n, m) for n, m in zip(natural, minimum)]
    while sum(widths) + gap * (len(widths) - 1) > width:
        narrowable = [i for i, w in enumerate(widths) if w > floor[i]]
        if not narrowable:
            break
        widest = max(narrowable, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


@dataclass
class Layout:
    """Column widths and the gap between columns; ``fits``: whether they fit the width asked for."""

    widths: list[int]
    gap: int
    fits: bool


def column_widths(headers: Sequence[str], cells: Sequence[Sequence[str]], width: int,
                  fixed: Sequence[int] = ()) -> Layout:
    """Widths fitting ``width``: every value whole with two spaces between columns if that fits, else one space
    and the text columns narrowed (to :data:`MIN_TEXT_WIDTH`), then the ``fixed`` ones (numbers, dates) too;
    when even that is too wide, the narrowest it gets."""
    natural = [max([cell_len(h)] + [cell_len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    texts_only = [natural[i] if i in fixed else MIN_TEXT_WIDTH for i in range(len(headers))]
    for gap, minimum in ((GAP, natural), (1, texts_only), (1, [MIN_TEXT_WIDTH] * len(headers))):
        widths = fit_widths(natural, minimum, width, gap)
        if sum(widths) + gap * (len(widths) - 1) <= width:
            return Layout(widths, gap, True)
    return Layout(widths, 1, False)


def fitted_table(headers: Sequence[str], cells: Sequence[Sequence[str]], layout: Layout, *,
                 right: Sequence[int] = (), caption: str | None = None) -> Table:
    """A compact table of plain text (no markup) laid out as ``layout``; a longer value ends in ``…``;
    ``right``: right-aligned columns."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  padding=(0, 1) if layout.gap == GAP else 0, caption=caption, caption_justify="left")
    for i, header in enumerate(headers):
        table.add_column(Text(header), justify="right" if i in right else "left", width=layout.widths[i],
                         no_wrap=True, overflow="ellipsis")
    for row in cells:
        table.add_row(*(Text(c) for c in row))
    return table


def runs_table(runs: Sequence[RunInfo], width: int) -> Table:
    """``fluency runs``: started, run folder, checkpoints, stimuli, metrics, status; one row per run."""
    headers = ["started", "run", "checkpoints", "stimuli", "metrics", "status"]
    cells = [[_when(r.started), r.run_dir, _checkpoints(r.checkpoints),
              f"{r.stimuli} ({r.images})" if r.images is not None else r.stimuli, ", ".join(r.metrics) or "–",
              r.status] for r in runs]
    layout = column_widths(headers, cells, width, fixed=(0, 5))
    short = short_names([row[1] for row in cells], layout.widths[1])  # run folders stay distinct
    cells = [[row[0], short[row[1]], *row[2:]] for row in cells]
    return fitted_table(headers, cells, layout, caption=f"{len(runs)} run{'s' * (len(runs) != 1)}")


def _when(started: str | None) -> str:
    """A run's start in local time to the minute."""
    moment = started_at(started)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment else "?"


def _checkpoints(labels: Sequence[str]) -> str:
    if not labels:
        return "–"
    return ", ".join(labels) if len(labels) <= MAX_LABELS else f"{len(labels)} checkpoints"


def result_table(result: QueryResult, width: int, max_rows: int = 0) -> Table:
    """A query's rows as a fitted table (at most ``max_rows`` of them; 0: all), the row count as caption."""
    shown = result.rows if not max_rows else result.rows[:max_rows]
    cells = [[cell_text(v) for v in row] for row in shown]
    numeric = [i for i in range(len(result.columns))
               if any(v is not None for v in _column(shown, i)) and all(_is_number(v) for v in _column(shown, i))]
    layout = column_widths(result.columns, cells, width, fixed=numeric)
    n = len(result.rows)
    caption = (f"{n} row{'s' * (n != 1)}" + (f", the first {len(shown)} shown (--max-rows 0 shows all)"
                                             if len(shown) < n else "")
               + ("" if layout.fits else f"; too many columns for {width} characters: select fewer, or use "
                                         "--format csv"))
    return fitted_table(result.columns, cells, layout, right=numeric, caption=caption)


def _column(rows: Sequence[Sequence[Any]], i: int) -> list[Any]:
    return [row[i] for row in rows]


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float, Decimal)) and not isinstance(value, bool))


def cell_text(value: Any) -> str:
    """One value as the terminal shows it: floats to 6 significant digits, NULL for a missing value."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(cell_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return json.dumps(json_value(value), ensure_ascii=False)
    return str(value)


def json_value(value: Any) -> Any:
    """One value as JSON: numbers as numbers (NaN and infinities as null), times in ISO 8601, lists and
    structs as arrays and objects, anything else as its text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return json_value(float(value))
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def json_records(result: QueryResult) -> list[dict[str, Any]]:
    """The rows as JSON objects, one key per column."""
    return [{c: json_value(v) for c, v in zip(result.columns, row)} for row in result.rows]


def csv_text(result: QueryResult) -> str:
    """The rows as CSV with a header: floats at full precision, missing values empty, lists as JSON arrays."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if v is None else json.dumps(json_value(v), ensure_ascii=False)
                         if isinstance(v, (list, tuple, Mapping)) else repr(v) if isinstance(v, float)
                         else json_value(v) for v in row])
    return out.getvalue()
