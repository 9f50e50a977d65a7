"""Which checkpoints a run measures: each once, under a readable, unique label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fluency.core.hashing import file_sha256
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT


def labels(paths: Sequence[Path]) -> list[str]:
    labels: list[str] = []
    for path in paths:
        label = "default" if path == DEFAULT_CHECKPOINT else path.stem
        if path.stem == "final" and path != DEFAULT_CHECKPOINT:
            label = path.resolve().parent.name or label  # '../final.pt' is named by its folder, not '..'
        base, k = label, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def unique_checkpoints(paths: Sequence[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """``paths`` without repeats, and one note per path left out (``path``, ``same_as``, ``why``, ``text``).

    A path is left out when it names the same file as an earlier one (``why``: ``"same
    path"`` once resolved, or ``"same file"``, e.g. a hard link) or a file with the same
    bytes (``"same content"``; sha256, computed only for files of equal size). Missing
    files are kept, for the loader to report.
    """
    kept: list[Path] = []
    notes: list[dict[str, str]] = []
    by_inode: dict[tuple[int, int], Path] = {}
    by_size: dict[int, list[Path]] = {}
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = file_sha256(path)
        return digests[path]

    for path in paths:
        try:
            st = path.stat()
        except OSError:
            kept.append(path)
            continue
        first = by_inode.get((st.st_dev, st.st_ino))
        if first is not None:
            same_path = first.resolve() == path.resolve()
            text = (f"--checkpoint {path} is given more than once" if str(path) == str(first) else
                    f"--checkpoint {path} is {'the same path' if same_path else 'the same file'} as {first}")
            notes.append({"path": str(path), "same_as": str(first), "why": "same path" if same_path else "same file",
                          "text": f"{text}: measured once"})
            continue
        twin = next((k for k in by_size.get(st.st_size, []) if digest(k) == digest(path)), None)
        if twin is not None:
            notes.append({"path": str(path), "same_as": str(twin), "why": "same content", "sha256": digest(path),
                          "text": f"--checkpoint {path} has the same content as {twin} (sha256 "
                                  f"{digest(path)[:12]}…): measured once, as {twin}"})
            continue
        by_inode[(st.st_dev, st.st_ino)] = path
        by_size.setdefault(st.st_size, []).append(path)
        kept.append(path)
    return kept, notes
