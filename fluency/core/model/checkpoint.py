"""Checkpoints: one self-describing file, read without unpickling arbitrary objects.

A checkpoint is a plain dict of strings, numbers, lists and tensors saved with
``torch.save`` and read with ``torch.load(weights_only=True)``::

    {"format": "fluency-checkpoint", "format_version": 1,
     "architecture": {"name": "vae-small", "options": {...}},
     "loss": {"reconstruction": "mse", "beta": 1.0},
     "optimizer": {"name": "adam", "options": {...}},
     "epoch": 30, "history": [{"epoch": 1, "loss": ...}, ...],
     "provenance": {...}, "state_dict": {...}}
"""

from __future__ import annotations

import io
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluency.core.atomic import atomic_write_bytes
from fluency.core.errors import CheckpointError, PluginError, error_text
from fluency.core.hashing import file_sha256
from fluency.core.plugin.architecture import FluencyModel
from fluency.core.plugin.manager import PluginManager

FORMAT = "fluency-checkpoint"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "data" / "default.pt"


def plain(value: Any) -> Any:
    """``value`` as tensors and plain str/int/float/bool/None/list/dict, the types ``weights_only=True`` accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k if isinstance(k, int) else str(k): plain(v) for k, v in value.items()}  # optimizer states: int keys
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return plain(value.item())
    return str(value)


def save_checkpoint(path: str | Path, model: FluencyModel, architecture: str, **info: Any) -> None:
    """Write a checkpoint atomically; ``info`` holds loss, optimizer, epoch, history, provenance, ...

    Everything but the weights is converted to plain Python types so that the file loads
    with ``weights_only=True``.
    """
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               **plain({"architecture": {"name": architecture, "options": dict(model.options)}, **info}),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read safely ({error_text(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a fluency checkpoint (no format marker {FORMAT!r})")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {payload['format_version']} is newer than "
                              f"this fluency understands ({FORMAT_VERSION}); upgrade fluency")
    return payload


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with the checkpoint's description."""

    path: Path
    label: str
    sha256: str
    model: FluencyModel
    info: dict[str, Any]

    @property
    def architecture(self) -> str:
        return str(self.info["architecture"]["name"])


def load_checkpoint(path: str | Path, manager: PluginManager, label: str | None = None) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint through its Architecture plugin and load its weights."""
    path = Path(path)
    payload = read_checkpoint(path)
    arch = payload["architecture"]
    try:
        spec = manager.get("architecture", arch["name"])
    except PluginError as exc:
        raise CheckpointError(f"checkpoint {path} needs the architecture plugin {arch['name']!r}: {exc}") from None
    # the weights come from the checkpoint: initialisation-only options must not re-read their files
    saved = {k: (None if k == "imagenet_weights" else v) for k, v in arch.get("options", {}).items()}
    options = spec.resolve(saved)
    model = spec.load()(**options)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit architecture {arch['name']!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return LoadedCheckpoint(path, label or path.stem, file_sha256(path), model, info)


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What a checkpoint is, JSON-ready: architecture, options, loss, optimizer, data, epochs, final losses."""
    payload = read_checkpoint(path)
    history = payload.get("history") or []
    last = history[-1] if history else {}
    return {
        "file": str(Path(path).resolve()), "sha256": file_sha256(path),
        "architecture": payload["architecture"]["name"], "options": payload["architecture"].get("options", {}),
        "parameters": int(sum(v.numel() for k, v in payload["state_dict"].items()
                              if v.is_floating_point() and not k.endswith(("running_mean", "running_var")))),
        "loss": payload.get("loss"), "optimizer": payload.get("optimizer"),
        "constraints": payload.get("constraints", []), "data": payload.get("data", {}),
        "epoch": payload.get("epoch"), "final_losses": {k: v for k, v in last.items() if k not in ("epoch",)},
        "provenance": payload.get("provenance", {}),
    }
