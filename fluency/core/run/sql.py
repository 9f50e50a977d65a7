"""SQL over every run below a folder (``fluency query``): DuckDB with three views.

- ``metrics``: every run's ``metrics.parquet`` (the columns of :mod:`fluency.core.run.tables`) plus
  ``run_dir``;
- ``analyses``: every run's ``analyses/*.parquet``, matched by column name (analyses have different
  columns; a column one lacks is null there), with ``analysis`` (the file's name) and ``run_dir``;
- ``runs``: one row per run, from :class:`~fluency.core.run.history.RunInfo`.

A run without ``metrics.parquet`` (failed, killed) adds no rows; a Parquet file DuckDB cannot read is
left out with a note. DuckDB is an optional extra (``fluency[query]``), imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluency.core.errors import FluencyError
from fluency.core.run.history import RunInfo, find_runs

INSTALL = 'fluency query needs DuckDB: pip install "fluency[query]"'
#: the ``runs`` view: column -> DuckDB type, in RunInfo's order
RUN_COLUMNS = {"run_dir": "VARCHAR", "run_id": "VARCHAR", "started": "VARCHAR", "finished": "VARCHAR",
               "status": "VARCHAR", "status_note": "VARCHAR", "stimuli": "VARCHAR", "images": "BIGINT",
               "checkpoints": "VARCHAR[]", "checkpoint_sha256": "VARCHAR[]", "metrics": "VARCHAR[]",
               "analyses": "VARCHAR[]", "fluency_version": "VARCHAR"}


@dataclass
class QueryResult:
    """What a query returned (column names, rows as Python values) and the notes on runs left out."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    notes: list[str]


def duckdb_module() -> Any:
    """The ``duckdb`` module; one line naming the extra when it is not installed."""
    try:
        import duckdb
    except ImportError:
        raise FluencyError(INSTALL) from None
    return duckdb


def query(sql: str, root: Path) -> QueryResult:
    """Run ``sql`` over the runs below ``root``; a DuckDB error is one line ``query: <its first line>``."""
    duckdb = duckdb_module()
    found = find_runs(root)
    con = duckdb.connect(":memory:")
    try:
        try:
            notes = [*found.notes, *create_views(con, found.runs)]
        except duckdb.Error as exc:  # e.g. a column of one type in one run, of another in the next
            raise FluencyError(f"query: the runs' tables do not combine: {first_line(exc)}") from None
        try:
            cursor = con.execute(sql)
        except duckdb.Error as exc:
            raise FluencyError(f"query: {first_line(exc)}") from None
        if cursor.description is None:  # a statement without a result (SET, CREATE ...)
            return QueryResult([], [], notes)
        columns = [d[0] for d in cursor.description]
        try:
            rows = cursor.fetchall()
        except duckdb.Error as exc:
            raise FluencyError(f"query: {first_line(exc)}") from None
        return QueryResult(columns, rows, notes)
    finally:
        con.close()


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def create_views(con: Any, runs: Sequence[RunInfo]) -> list[str]:
    """Create the views ``metrics``, ``analyses`` and ``runs`` on the connection; the notes on unreadable files."""
    notes: list[str] = []
    metric_files = [(info.path / "metrics.parquet", info.run_dir, "") for info in runs]
    analysis_files = [(path, info.run_dir, path.stem) for info in runs
                      for path in sorted((info.path / "analyses").glob("*.parquet"))]
    metric_files = readable(con, [f for f in metric_files if f[0].is_file()], notes)
    analysis_files = readable(con, [f for f in analysis_files if f[0].is_file()], notes)
    con.execute(f"CREATE VIEW metrics AS {metrics_select(con, metric_files)}")
    con.execute(f"CREATE VIEW analyses AS {analyses_select(con, analysis_files)}")
    create_runs(con, runs)
    return notes


def readable(con: Any, files: list[tuple[Path, str, str]], notes: list[str]) -> list[tuple[Path, str, str]]:
    """The ``(path, run_dir, name)`` whose Parquet file DuckDB reads; a note for each other one."""
    error = duckdb_module().Error
    if not files:
        return files
    try:
        con.execute(f"SELECT * FROM {scan(files)} LIMIT 0")
        return files
    except error:  # find which file it was, one at a time
        pass
    kept = []
    for entry in files:
        try:
            con.execute(f"SELECT * FROM {scan([entry])} LIMIT 0")
            kept.append(entry)
        except error as exc:
            notes.append(f"{entry[0]}: left out, DuckDB cannot read it ({first_line(exc)})")
    return kept


def scan(files: Sequence[tuple[Path, str, str]]) -> str:
    """DuckDB's ``read_parquet`` of the files, columns matched by name, the path in ``_file``."""
    paths = ", ".join(literal(str(path)) for path, _, _ in files)
    return f"read_parquet([{paths}], union_by_name=true, filename='_file')"


def file_table(con: Any, name: str, files: Sequence[tuple[Path, str, str]]) -> None:
    """A table ``name`` mapping each file's path to its run folder and name (the join that labels the rows)."""
    con.execute(f"CREATE TABLE {name} (_file VARCHAR, run_dir VARCHAR, name VARCHAR)")
    con.executemany(f"INSERT INTO {name} VALUES (?, ?, ?)", [(str(p), r, n) for p, r, n in files])


def metrics_select(con: Any, files: Sequence[tuple[Path, str, str]]) -> str:
    """The metrics view's query: the metric table's columns (a column an old table lacks is null) and run_dir."""
    from fluency.core.run.tables import METRIC_SCHEMA

    kinds = {f.name: "DOUBLE" if f.name == "value" else "VARCHAR" for f in METRIC_SCHEMA}
    if not files:
        return "SELECT " + ", ".join(f"NULL::{t} AS {ident(c)}" for c, t in {**kinds, "run_dir": "VARCHAR"}.items()) \
            + " WHERE false"
    file_table(con, "_metric_files", files)
    present = set(columns_of(con, scan(files)))
    chosen = [f"t.{ident(c)}::{t} AS {ident(c)}" if c in present else f"NULL::{t} AS {ident(c)}"
              for c, t in kinds.items()]
    return f"SELECT {', '.join(chosen)}, f.run_dir FROM {scan(files)} t JOIN _metric_files f USING (_file)"


def analyses_select(con: Any, files: Sequence[tuple[Path, str, str]]) -> str:
    """The analyses view's query: ``analysis`` (the file's name), every column of any analysis, run_dir."""
    if not files:
        return "SELECT NULL::VARCHAR AS analysis, NULL::VARCHAR AS run_dir WHERE false"
    file_table(con, "_analysis_files", files)
    others = [c for c in columns_of(con, scan(files)) if c not in ("_file", "analysis", "run_dir")]
    chosen = "".join(f", t.{ident(c)}" for c in others)
    return (f"SELECT f.name AS analysis{chosen}, f.run_dir FROM {scan(files)} t "
            "JOIN _analysis_files f USING (_file)")


def create_runs(con: Any, runs: Sequence[RunInfo]) -> None:
    """The ``runs`` view: one row per run."""
    con.execute("CREATE TABLE _runs (" + ", ".join(f"{ident(c)} {t}" for c, t in RUN_COLUMNS.items()) + ")")
    rows = [tuple(info.as_dict()[c] for c in RUN_COLUMNS) for info in runs]
    if rows:
        con.executemany(f"INSERT INTO _runs VALUES ({', '.join('?' * len(RUN_COLUMNS))})", rows)
    con.execute("CREATE VIEW runs AS SELECT * FROM _runs")


def columns_of(con: Any, relation: str) -> list[str]:
    """The column names of a relation (read from the Parquet footers only)."""
    return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
