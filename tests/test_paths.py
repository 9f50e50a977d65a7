"""Paths kept as strings (issue 16, flat memory): ``PathList`` and ``PathMap`` read like a list and a dict
of ``pathlib.Path`` (the oracle here), and a folder source holds a string per image, not a ``Path``."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

from fluency.api import FolderSource, Preprocessing
from fluency.core.inputs.paths import PathList, PathMap
from fluency.core.inputs.ratings import match_ids


def test_path_list_reads_like_a_list_of_paths(tmp_path: Path) -> None:
    paths = [tmp_path / f"d{i % 3}" / f"{i}.png" for i in range(10)]
    listed = PathList([*paths[:5], *map(str, paths[5:])])
    assert len(listed) == 10 and list(listed) == paths
    assert listed[3] == paths[3] and listed[-1] == paths[-1] and isinstance(listed[0], Path)
    assert listed[2:7] == paths[2:7] and listed[::-3] == paths[::-3]
    assert paths[4] in listed and listed.index(paths[6]) == 6
    with pytest.raises(IndexError):
        listed[10]


def test_path_map_reads_like_a_dict_of_paths(tmp_path: Path) -> None:
    expected = {"b": tmp_path / "b.jpg", "a": tmp_path / "x" / "a.png"}
    mapped = PathMap([("b", str(expected["b"])), ("a", expected["a"])])
    assert mapped == expected and list(mapped) == ["b", "a"] and mapped["a"] == expected["a"]
    mapped["c"] = tmp_path / "c.png"
    del mapped["b"]
    assert dict(mapped) == {"a": expected["a"], "c": tmp_path / "c.png"} and "b" not in mapped
    assert mapped.names() == {"a": str(expected["a"]), "c": str(tmp_path / "c.png")}
    with pytest.raises(KeyError):
        mapped["b"]


def test_a_folder_source_keeps_a_string_per_image_not_a_path(tmp_path: Path) -> None:
    """A ``Path`` per image held for a whole run cost ~0.5 KB of objects; its string is shared, not copied."""
    n = 20_000
    files = {f"img-{i}": tmp_path / "images" / f"img-{i}.png" for i in range(n)}
    tracemalloc.start()
    try:
        source = FolderSource(tmp_path / "images", files, Preprocessing(size=None))
        del files
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(source) == n and source.paths[7] == tmp_path / "images" / "img-7.png"
    assert held < 200 * n


def test_matched_files_are_kept_as_strings(tmp_path: Path) -> None:
    files = [tmp_path / f"{i}.png" for i in range(5)]
    report = match_ids([str(i) for i in range(5)], tmp_path, files)
    assert isinstance(report.matched, PathMap)
    assert report.matched == {str(i): files[i] for i in range(5)}
    assert report.as_dict()["matched"]["3"] == str(files[3])
