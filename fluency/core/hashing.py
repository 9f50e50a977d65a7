"""Content hashes: the one sha256 of a file, and the hash that tells two option sets apart."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, streamed in 1 MiB blocks (raises ``OSError`` if unreadable)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def options_hash(options: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of ``options`` as canonical JSON (sorted keys): equal options, equal hash."""
    text = json.dumps(dict(options), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
