"""Checkpoints: one self-describing file, read without unpickling arbitrary objects.

A checkpoint is a plain dict of strings, numbers, lists and tensors saved with
``torch.save`` and read with ``torch.load(weights_only=True)``::

    {"format": "fluency-checkpoint", "format_version": 1,
     "architecture": {"name": "vae-small", "options": {...}},
     "loss": {"reconstruction": "mse", "beta": 1.0},
     "optimizer": {"name": "adam", "options": {...}},
     "epoch": 30, "history": [{"epoch": 1, "loss": ...}, ...],
     "provenance": {...}, "state_dict": {...}}

Reading is guarded: anything but a zip archive of stored (uncompressed) records that
``torch.save`` writes is "not a fluency checkpoint" before torch sees it, so loading
never needs more memory than the file's size; the fields are checked before they are
used; and the architecture's options are validated against its option schema (with
its bounds) and the model's parameter count (built on the meta device, no memory)
against :data:`MAX_PARAMETERS` before any real model is built. Every failure is one
:class:`CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import re
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fluency.core.atomic import atomic_write_bytes
from fluency.core.errors import CheckpointError, FluencyError, PluginError, error_text
from fluency.core.hashing import file_sha256
from fluency.core.plugin.architecture import FluencyModel
from fluency.core.plugin.manager import PluginManager, guarded
from fluency.core.plugin.options import brief_repr
from fluency.core.plugin.specs import PluginSpec
from fluency.core.model.replicates import replicate_of

FORMAT = "fluency-checkpoint"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "data" / "default.pt"
#: the largest model a checkpoint may describe: 2 billion parameters (8 GB of float32 weights), far above
#: the built-in models (under 40 million) and refused before it is built, so that absurd sizes in a
#: checkpoint's options cannot start a huge allocation
MAX_PARAMETERS = 2_000_000_000


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


def _short(value: Any, limit: int = 60) -> str:
    """A field's value for a message, cut to ``limit`` characters (a hostile field cannot flood it)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return brief_repr(value, limit)


def _archive_problem(path: Path) -> str | None:
    """Why ``path`` is not an archive ``torch.save`` writes (zip, a ``data.pkl``, stored records that fit
    in the file), or None; checked before torch reads it, so torch never inflates a record."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception as exc:  # noqa: BLE001 — zipfile raises many types for foreign bytes
        return f"not the zip archive that torch.save writes ({error_text(exc, 80)})"
    if not any(r.filename == "data.pkl" or r.filename.endswith("/data.pkl") for r in records):
        return "a zip archive without the data.pkl that torch.save writes"
    size = path.stat().st_size
    if any(r.compress_type != zipfile.ZIP_STORED or r.file_size > size for r in records) \
            or sum(r.file_size for r in records) > size:
        return "a zip archive with compressed or oversized records, which torch.save never writes"
    return None


def _load_failure(exc: BaseException) -> str:
    """What torch's refusal of a file means, in fluency's words (never torch's advice to unpickle anyway)."""
    text = " ".join(str(exc).split())
    detail = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\.?$)", text)
    if detail and "Unsupported global" in detail.group(1):
        return (f"not a fluency checkpoint: it holds Python objects, not only tensors and plain data "
                f"({detail.group(1)[:120]}), and fluency never unpickles those")
    reason = detail.group(1)[:120] if detail else (type(exc).__name__ if "weights_only" in text
                                                   else error_text(exc, 120))
    return f"not a fluency checkpoint: torch cannot read it ({reason})"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True`` and its fields checked (:func:`check_fields`);
    every failure is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    problem = _archive_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: not a fluency checkpoint: {problem}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: {_load_failure(exc)}") from None
    check_fields(path, payload)
    return payload


def check_fields(path: Path, payload: Any) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` and the field if ``payload`` lacks a field fluency
    reads or holds one of the wrong type: ``format``, ``format_version``, ``architecture`` (``name``,
    ``options``), ``state_dict`` (names to tensors), ``epoch`` and ``history`` if present."""
    where = f"checkpoint {path}"
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a fluency checkpoint (no format marker {FORMAT!r})")
    missing = [key for key in ("format_version", "architecture", "state_dict") if key not in payload]
    if missing:
        raise CheckpointError(f"{where}: no field {missing[0]} (a damaged file, or not one fluency wrote)")
    version = payload["format_version"]
    if type(version) is not int:
        raise CheckpointError(f"{where}: field format_version is {_short(version)}, not a whole number")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {_short(version)} is newer than this fluency understands "
                              f"({FORMAT_VERSION}); upgrade fluency")
    if version < 1:
        raise CheckpointError(f"{where}: format version {_short(version)} is not one fluency writes "
                              f"(1 to {FORMAT_VERSION})")
    arch = payload.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise CheckpointError(f"{where}: field architecture is {_short(arch)}, not "
                              "{'name': <architecture>, 'options': {...}}")
    options = arch.setdefault("options", {})
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise CheckpointError(f"{where}: field architecture.options is {_short(options)}, not a table of options")
    weights = payload.get("state_dict")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise CheckpointError(f"{where}: field state_dict is {_short(weights)}, not a table of named tensors")
    epoch = payload.get("epoch")
    if epoch is not None and type(epoch) is not int:
        raise CheckpointError(f"{where}: field epoch is {_short(epoch)}, not a whole number")
    history = payload.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise CheckpointError(f"{where}: field history is {_short(history)}, not a list of epoch records")


def check_training_state(path: Path, payload: dict[str, Any]) -> None:
    """Raise a :class:`CheckpointError` unless ``payload`` holds what ``fluency train --resume`` continues from:
    the ``training`` state that training writes in ``last.pt`` (config, optimizer and RNG states, scheduler
    state or None) and a whole ``epoch``."""
    training = payload.get("training")
    fields = {"config": dict, "optimizer_state": dict, "rng_state": torch.Tensor, "scheduler_state": (dict, type(None))}
    if not isinstance(training, dict):
        problem = "has no training state (optimizer, random generator, settings)"
    elif bad := [k for k, kind in fields.items() if not isinstance(training.get(k), kind)]:
        problem = f"has a damaged training state (field training.{bad[0]} is {_short(training.get(bad[0]))})"
    elif type(payload.get("epoch")) is not int:
        problem = f"has no whole epoch (field epoch is {_short(payload.get('epoch'))})"
    else:
        return
    raise CheckpointError(f"--resume: checkpoint {path} {problem}: it is not one that fluency train writes while "
                          "training, so training cannot continue from it; train afresh into another --out")


class _ValuesSkipped(TorchFunctionMode):
    """Skips initialisers and other shape-keeping value operations on meta tensors: they compute nothing
    there, and torch runs several through slow Python references (importing ``torch._dynamo``, seconds)."""

    SKIPPED = frozenset({"normal_", "uniform_", "fill_", "zero_", "copy_", "normalize", "kaiming_normal_",
                         "kaiming_uniform_", "xavier_normal_", "xavier_uniform_", "trunc_normal_", "orthogonal_",
                         "constant_", "ones_", "zeros_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if getattr(func, "__name__", "") in self.SKIPPED and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _parameter_count(factory: Callable[..., Any], options: dict[str, Any]) -> int | None:
    """Parameters of the model ``factory(**options)`` builds, counted on the meta device (nothing
    allocated); None if the plugin cannot build on it (then only its option bounds guard it)."""
    try:
        with torch.device("meta"), _ValuesSkipped():
            model = factory(**options)
    except FluencyError:
        raise
    except Exception:  # noqa: BLE001 — e.g. a plugin that reads tensor values while it builds
        return None
    return sum(p.numel() for p in model.parameters())


def check_checkpoint(path: str | Path, manager: PluginManager) -> tuple[dict[str, Any], PluginSpec, dict[str, Any]]:
    """``(payload, architecture spec, validated options)`` of a checkpoint, checked without building its model:
    its fields, its architecture plugin, its options against the plugin's schema and bounds, and its model's
    size against :data:`MAX_PARAMETERS`. Every failure is one :class:`CheckpointError` naming the file."""
    path = Path(path)
    payload = read_checkpoint(path)
    arch = payload["architecture"]
    try:
        spec = manager.get("architecture", arch["name"])
    except PluginError as exc:
        raise CheckpointError(f"checkpoint {path} needs the architecture plugin {arch['name']!r}: {exc}") from None
    # the weights come from the checkpoint: initialisation-only options must not re-read their files
    saved = {k: (None if k == "imagenet_weights" else v) for k, v in arch["options"].items()}
    try:
        options = spec.resolve(saved)
        count = _parameter_count(spec.load(), options)
    except FluencyError as exc:  # an option outside its schema, an invalid combination
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    if count is not None and count > MAX_PARAMETERS:
        raise CheckpointError(f"checkpoint {path}: its architecture options describe a model of {count:,} "
                              f"parameters, more than fluency builds ({MAX_PARAMETERS:,}); options "
                              f"{_short(arch['options'], 200)}")
    return payload, spec, options


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with the checkpoint's description; or one built without a
    checkpoint (:func:`build_model`: ``path`` is its weights' file, None for untrained weights, and
    ``info`` records them under ``"weights"``)."""

    path: Path | None
    label: str
    sha256: str
    model: FluencyModel
    info: dict[str, Any]

    @property
    def architecture(self) -> str:
        return str(self.info["architecture"]["name"])


def load_checkpoint(path: str | Path, manager: PluginManager, label: str | None = None) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint through its Architecture plugin (once :func:`check_checkpoint` has
    passed) and load its weights."""
    path = Path(path)
    payload, spec, options = check_checkpoint(path, manager)
    name = payload["architecture"]["name"]
    try:
        model = spec.load()(**options)
    except FluencyError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit architecture {name!r}: "
                              f"{(str(exc).splitlines() or [type(exc).__name__])[0][:300]}") from None
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return LoadedCheckpoint(path, label or path.stem, file_sha256(path), model, info)


def state_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 of a model's state dict (names, dtypes, shapes and bytes in order): the identity of weights
    that come from no file."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_model(name: str, options: dict[str, Any], manager: PluginManager, label: str | None = None,
                seed: int = 0) -> LoadedCheckpoint:
    """The architecture ``name`` built with ``options`` and no checkpoint (``fluency run --model NAME``): a
    pretrained network with the weights its plugin loads (:meth:`FluencyModel.weights_origin`), or an
    untrained one with weights drawn from ``seed``. Its identity is the name and the weights' sha256 (of the
    pretrained weights' file, else of the state dict)."""
    spec = manager.get("architecture", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = guarded(manager, "architecture", name, lambda: spec.load()(**options))
    origin = model.weights_origin()
    weights = ({"kind": "pretrained", **origin} if origin is not None else
               {"kind": "untrained", "seed": seed, "sha256": state_sha256(model)})
    info = {"architecture": {"name": name, "options": dict(model.options)}, "weights": weights}
    path = Path(origin["file"]) if origin is not None else None
    return LoadedCheckpoint(path, label or name, weights["sha256"], model, info)


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
        "provenance": payload.get("provenance", {}), "replicate": replicate_of(payload),
    }
