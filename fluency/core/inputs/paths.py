"""Paths kept as strings, made :class:`~pathlib.Path` on access.

A run holds a path per image for its whole length: as a ``Path`` (its parts, its string, its hash) that
is ~0.5 KB of Python objects against ~0.1 KB for the string alone, 50 MB at 100,000 images (issue 16,
flat memory). These containers look like a list and a dict of paths to their readers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


class PathList(Sequence[Path]):
    """A list of paths; indexing (a slice too) and iterating give ``Path`` objects."""

    def __init__(self, paths: Iterable[PathLike] = ()) -> None:
        self._names = [os.fspath(p) for p in paths]

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [Path(name) for name in self._names[index]]
        return Path(self._names[index])

    def __iter__(self) -> Iterator[Path]:
        return (Path(name) for name in self._names)

    def __repr__(self) -> str:
        return f"PathList({self._names!r})"


class PathMap(MutableMapping[str, Path]):
    """A dict from keys (image ids) to paths, in insertion order; values read back as ``Path`` objects."""

    def __init__(self, items: Iterable[tuple[str, PathLike]] | None = None) -> None:
        self._names: dict[str, str] = {key: os.fspath(path) for key, path in (items or ())}

    def __getitem__(self, key: str) -> Path:
        return Path(self._names[key])

    def __setitem__(self, key: str, path: PathLike) -> None:
        self._names[key] = os.fspath(path)

    def __delitem__(self, key: str) -> None:
        del self._names[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def names(self) -> dict[str, str]:
        """The paths as strings (a copy), e.g. for a manifest."""
        return dict(self._names)

    def __repr__(self) -> str:
        return f"PathMap({self._names!r})"
