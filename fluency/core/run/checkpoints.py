"""Which models a run measures: checkpoints and named models (``--model``), each once, under a readable,
unique label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluency.core.hashing import file_sha256
from fluency.core.model.capture import layer_shapes
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, LoadedCheckpoint, build_model, load_checkpoint
from fluency.core.plugin.config import read_config, resolve_plugin_options
from fluency.core.plugin.manager import PluginManager, get_plugin_manager


@dataclass
class ModelRef:
    """One model a run measures, under ``label``: a checkpoint file (``path``) or a model built without one
    (``built``, by ``--model NAME``, already validated)."""

    label: str
    path: Path | None = None
    built: LoadedCheckpoint | None = None

    def load(self, manager: PluginManager) -> LoadedCheckpoint:
        """The model, with its identity (label, sha256) and description."""
        if self.built is not None:
            return self.built
        assert self.path is not None
        return load_checkpoint(self.path, manager, self.label)


def labels(paths: Sequence[Path], names: Sequence[str] = ()) -> list[str]:
    """One unique label per checkpoint (its stem; ``final.pt`` by its folder), then per named model (its name)."""
    labels: list[str] = []
    wanted = []
    for path in paths:
        label = "default" if path == DEFAULT_CHECKPOINT else path.stem
        if path.stem == "final" and path != DEFAULT_CHECKPOINT:
            label = path.resolve().parent.name or label  # '../final.pt' is named by its folder, not '..'
        wanted.append(label)
    for label in [*wanted, *names]:
        base, k = label, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def unique_models(names: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """``--model`` names without repeats (options are per name, so a repeat is the same model), with a note each."""
    kept = list(dict.fromkeys(names))
    notes = [{"model": name, "why": "same name", "text": f"--model {name} is given more than once: measured once"}
             for name in sorted({n for n in names if names.count(n) > 1})]
    return kept, notes


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


def inspect_model(name: str | None, checkpoint: Path | None, options: Sequence[str] = (),
                  config: Path | None = None, probe: int = 224) -> dict[str, Any]:
    """What ``fluency inspect`` shows of ``--model NAME`` (built with ``options``) or a checkpoint: identity,
    kind, capabilities, input size and every hookable layer with its output shape for one probe image."""
    manager = get_plugin_manager()
    if name is not None:
        manager.get("architecture", name)
        resolved = resolve_plugin_options(manager, [("architecture", name)], options,
                                          read_config(str(config)) if config else None)
        loaded = build_model(name, resolved[("architecture", name)], manager)
    else:
        assert checkpoint is not None
        loaded = load_checkpoint(checkpoint, manager, labels([checkpoint])[0])
    model = loaded.model.eval()
    channels, height, width = model.input_shape
    size = (height or probe, width or probe)
    defaults = set(model.default_metric_layers)
    shapes = layer_shapes(model, *size)
    return {"label": loaded.label, "architecture": loaded.architecture, "kind": model.kind,
            "provides": sorted(model.provides), "sha256": loaded.sha256,
            "input": f"{channels}×{height}×{width}" if height else f"{channels}×H×W (images at their own size)",
            "probe": f"{size[0]}×{size[1]}", "options": dict(model.options),
            "layers": [{"name": k, "shape": list(v), "default": k in defaults} for k, v in shapes.items()]}
