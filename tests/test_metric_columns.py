"""The compact metric table (:mod:`fluency.core.plugin.metric_columns`) against pandas on the long table.

Every accessor is checked against the pandas operation the analyses and the report used before
(filtering, ``groupby(sort=True, dropna=False)``, ``pivot_table(aggfunc="first")``, ``describe``),
on a table with whole-model rows (layer None), a repeated image, missing values and images that
only some outputs have; and the streaming reader against ``read_metric_table`` on a written table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fluency.core.errors import StoreError
from fluency.core.outputs.report import metric_summary
from fluency.core.plugin.analysis import AnalysisData
from fluency.core.plugin.metric_columns import MetricColumns
from fluency.core.run.folder import RunResult
from fluency.core.run.tables import MetricTableWriter, count_metric_rows, read_metric_columns, read_metric_table


def long_table(seed: int = 0) -> pd.DataFrame:
    """Two checkpoints × (two layered metrics, one whole-model metric); B lacks some images, one row
    repeats an image (the first value counts), some values are NaN, rows of outputs interleave."""
    rng = np.random.default_rng(seed)
    frames = []
    for checkpoint, n in (("B", 12), ("A", 15)):
        ids = [f"img{k:02d}" for k in rng.permutation(15)[:n]]
        for metric, layers in (("gini", ["enc2", "enc1"]), ("luminance", [None]), ("lepsilon", [None, "enc1"])):
            for layer in layers:
                frames.append(pd.DataFrame({"image_id": ids, "checkpoint": checkpoint, "metric": metric,
                                            "layer": layer, "value": rng.normal(size=n)}))
    table = pd.concat(frames, ignore_index=True)
    table.loc[[3, 40], "value"] = np.nan
    repeat = table.iloc[[5]].assign(value=99.0)
    table = pd.concat([table, repeat], ignore_index=True)
    return table.sample(frac=1, random_state=seed).reset_index(drop=True)  # outputs interleave


def plain(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns with None for a missing layer, sorted: tables compared by content, not storage."""
    table = table.astype({c: object for c in ("image_id", "checkpoint", "metric", "layer")})
    table["layer"] = table["layer"].where(table["layer"].notna(), None)
    key = ["checkpoint", "metric", "layer", "image_id", "value"]
    return table.sort_values(key, key=lambda s: s.fillna("") if s.dtype == object else s)[key].reset_index(drop=True)


def select(table: pd.DataFrame, checkpoint: str, metric: str, layer: str | None) -> pd.DataFrame:
    rows = (table["checkpoint"] == checkpoint) & (table["metric"] == metric)
    return table[rows & (table["layer"].isna() if layer is None else table["layer"] == layer)]


def test_outputs_and_values_match_pandas_filtering() -> None:
    table = long_table()
    columns = MetricColumns.from_long(table)
    expected = [(c, m, None if pd.isna(lay) else lay) for (c, m, lay), _ in
                table.groupby(["checkpoint", "metric", "layer"], dropna=False, sort=False)]
    assert columns.outputs() == expected  # first appearance in the table
    assert columns.n_rows() == len(table)
    assert sorted(columns.image_ids()) == sorted(table["image_id"].unique())
    for key in expected:
        want = select(table, *key)
        got = columns.values(key)
        assert list(got.index) == list(want["image_id"])  # the table's order, repeats kept
        np.testing.assert_array_equal(got.to_numpy(), want["value"].to_numpy())


def test_rows_select_by_any_fields() -> None:
    table = long_table(1)
    columns = MetricColumns.from_long(table)
    for where in ({"checkpoint": "A"}, {"metric": "gini"}, {"layer": None}, {"metric": "gini", "layer": "enc1"},
                  {"checkpoint": "B", "metric": "luminance", "layer": None}, {"metric": "absent"}):
        mask = pd.Series(True, index=table.index)
        for field, value in where.items():
            mask &= table[field].isna() if value is None else table[field] == value
        pd.testing.assert_frame_equal(plain(columns.rows(**where)), plain(table[mask]))
    with pytest.raises(TypeError, match="unknown field"):
        columns.rows(image="x")


def test_wide_is_pivot_table_first_and_restrict_is_isin() -> None:
    table = long_table(2)
    columns = MetricColumns.from_long(table)
    outputs = columns.outputs()  # the repeated image is in one of them: its first value counts
    got = columns.wide(outputs)
    parts = {k: select(table, *k).dropna(subset=["value"]).drop_duplicates("image_id").set_index("image_id")["value"]
             for k in outputs}
    want = pd.concat(parts.values(), axis=1)
    want = want.reindex(got.index)
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    assert set(got.index) == set(pd.concat([select(table, *k) for k in outputs])["image_id"])
    ids = ["img01", "img03", "img07", "nope"]
    kept = columns.restrict(ids)
    pd.testing.assert_frame_equal(plain(kept.to_long()), plain(table[table["image_id"].isin(ids)]))
    assert columns.restrict(table["image_id"]) is columns


def test_analysis_data_slices_equal_the_joined_groups() -> None:
    table = long_table(3)
    ratings = pd.DataFrame({"image_id": [f"img{k:02d}" for k in range(0, 15, 2)], "rating": np.arange(8.0)})
    data = AnalysisData(table, ratings, "rating")
    joined = table.merge(ratings, on="image_id", how="inner")
    groups = list(joined.groupby(["checkpoint", "metric", "layer"], dropna=False, sort=True))
    outputs = data.groups("checkpoint", "metric", "layer")
    assert outputs == [(c, m, None if pd.isna(lay) else lay) for (c, m, lay), _ in groups]  # layer None last
    assert data.groups("metric", "layer") == [("gini", "enc1"), ("gini", "enc2"), ("lepsilon", "enc1"),
                                              ("lepsilon", None), ("luminance", None)]
    for (checkpoint, metric, layer), (_, want) in zip(outputs, groups):
        got = data.rows(checkpoint=checkpoint, metric=metric, layer=layer)
        got = got[got["rating"].notna()]  # rows() keeps unrated images (rating NaN); joined() drops them
        assert list(got["image_id"]) == list(want["image_id"])
        np.testing.assert_array_equal(got["value"], want["value"])
        np.testing.assert_array_equal(got["rating"], want["rating"])
    with pytest.raises(TypeError):
        data.groups("image_id")


def test_the_long_table_is_built_on_first_use_only() -> None:
    table = long_table(4)
    data = AnalysisData(MetricColumns.from_long(table), pd.DataFrame({"image_id": [], "rating": []}), "rating")
    assert data._metrics is None
    assert len(data.metrics) == len(table) and data._metrics is not None
    given = AnalysisData(table, pd.DataFrame({"image_id": [], "rating": []}), "rating")
    assert given.metrics is table  # a DataFrame given is the table plugins read


def test_metric_summary_matches_describe() -> None:
    table = long_table(5)
    want = table.groupby(["checkpoint", "metric", "layer"], dropna=False)["value"].describe().reset_index()
    got = metric_summary(MetricColumns.from_long(table))
    assert [tuple(r) for r in got[["checkpoint", "metric"]].itertuples(index=False)] == \
        [tuple(r) for r in want[["checkpoint", "metric"]].itertuples(index=False)]
    assert list(got["layer"].isna()) == list(want["layer"].isna())
    for column in ("count", "mean", "std", "min", "max"):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-12)


def written(path, table: pd.DataFrame) -> None:
    with MetricTableWriter(path, "run", rows_per_group=10, plugin="p", plugin_version="1", options_hash="h") as w:
        for (c, m, lay), rows in table.groupby(["checkpoint", "metric", "layer"], dropna=False, sort=False):
            w.write(c, m, None if pd.isna(lay) else lay, list(rows["image_id"]), rows["value"].to_numpy())


def test_the_streaming_reader_equals_the_whole_table(tmp_path) -> None:
    path = tmp_path / "metrics.parquet"
    written(path, long_table(6))
    whole = MetricColumns.from_long(read_metric_table(path))
    for batch_rows in (7, 1 << 18):  # batches that split outputs, and one batch
        streamed = read_metric_columns(path, batch_rows=batch_rows)
        assert streamed.outputs() == whole.outputs()
        for key in whole.outputs():
            pd.testing.assert_series_equal(streamed.values(key), whole.values(key))
    table = read_metric_table(path)
    assert count_metric_rows(path) == (len(table), table["image_id"].nunique())
    result = RunResult(tmp_path)  # the run's table, read when first asked for
    assert result.metric_counts() == count_metric_rows(path)
    pd.testing.assert_frame_equal(result.metrics, table)


def test_a_missing_or_damaged_table_is_one_line(tmp_path) -> None:
    with pytest.raises(StoreError, match="no such file"):
        read_metric_columns(tmp_path / "metrics.parquet")
    (tmp_path / "metrics.parquet").write_bytes(b"PAR1 not parquet")
    for read in (read_metric_columns, count_metric_rows):
        with pytest.raises(StoreError, match="unreadable"):
            read(tmp_path / "metrics.parquet")


def test_a_table_without_a_needed_column_is_one_line(tmp_path) -> None:
    """A Parquet file without the ``layer`` column (not written by fluency) names the file, no KeyError."""
    path = tmp_path / "metrics.parquet"
    pd.DataFrame({"image_id": ["a", "b"], "checkpoint": ["m", "m"], "metric": ["g", "g"],
                  "value": [1.0, 2.0]}).to_parquet(path)
    with pytest.raises(StoreError, match=r"metrics.parquet: missing column\(s\) \['layer'\]"):
        read_metric_columns(path)
    assert count_metric_rows(path) == (2, 2)
