"""Which models a run measures: checkpoints and named models (``--model``), each once, under a readable,
unique label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluency.core.errors import FluencyError
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
    #: how another process builds a ``--model`` again: (architecture name, resolved options, seed)
    recipe: tuple[str, dict[str, Any], int] | None = None

    def portable(self) -> ModelRef:
        """This reference as sent to another process: a built model by its recipe, not its weights."""
        if self.recipe is not None:
            return ModelRef(self.label, None, None, self.recipe)
        return ModelRef(self.label, self.path.resolve() if self.path is not None else None)

    def load(self, manager: PluginManager) -> LoadedCheckpoint:
        """The model, with its identity (label, sha256) and description."""
        if self.built is not None:
            return self.built
        if self.recipe is not None:
            name, options, seed = self.recipe
            return build_model(name, dict(options), manager, self.label, seed)
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


_GLOB = set("*?[")


def expand_checkpoints(specs: Sequence[str], listing: str | Path | None = None) -> list[Path]:
    """The checkpoint files named by ``specs`` (paths, globs such as ``runs/*/final.pt`` with ``**`` for any depth,
    folders: every ``*.pt`` below them) and by the lines of ``listing`` (the same forms, relative to the file's
    folder; blank lines and ``#`` comments skipped), in order; one line for a glob or folder that names none."""
    entries = [(str(s), Path.cwd(), "--checkpoint") for s in specs]
    if listing is not None:
        entries += _listed(Path(listing))
    found: list[Path] = []
    for spec, base, where in entries:
        path = Path(spec) if Path(spec).is_absolute() else base / spec
        if _GLOB & set(spec) and not path.exists():  # a name with brackets is a file, not a pattern
            matches = sorted(p for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))) if p.is_file())
            if not matches:
                raise FluencyError(f"{where} {spec}: matches no file")
            found += [_relative(p, base) if not Path(spec).is_absolute() else p for p in matches]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*.pt") if p.is_file())
            if not matches:
                raise FluencyError(f"{where} {spec}: a folder without checkpoints (*.pt files)")
            found += [_relative(p, base) if not Path(spec).is_absolute() else p for p in matches]
        else:
            found.append(Path(spec) if base == Path.cwd() else path)
    return found


def _listed(listing: Path) -> list[tuple[str, Path, str]]:
    """The entries of a --checkpoints-from file, each with the folder it is relative to and how errors name it."""
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FluencyError(f"--checkpoints-from {listing}: unreadable ({getattr(exc, 'strerror', None) or exc})") \
            from None
    entries = [(line.split("#", 1)[0].strip(), n) for n, line in enumerate(lines, 1)]
    entries = [(text, n) for text, n in entries if text]
    if not entries:
        raise FluencyError(f"--checkpoints-from {listing}: lists no checkpoint")
    return [(text, listing.resolve().parent, f"--checkpoints-from {listing} line {n}:") for text, n in entries]


def _relative(path: Path, base: Path) -> Path:
    """``path`` relative to the current folder when it lies below it (labels and messages stay short)."""
    try:
        return path.relative_to(Path.cwd()) if base == Path.cwd() else path
    except ValueError:
        return path
