"""Units of work: one task per (checkpoint × stimulus shard), each writing its own parts, reusable on a rerun.

A run is cut into units so that any executor (in-process, a Dask cluster, SLURM jobs) can run them in any
order and a rerun after an interruption computes only what is missing. A unit writes::

    RUN/units/<label>/<shard>/metrics/<plugin>-<options hash>.parquet   its rows of one metric plugin
    RUN/units/<label>/<shard>/metrics/<plugin>-<options hash>.json      the part's receipt (written after it)
    RUN/units/<label>/<shard>/unit.json       the receipt of its forward pass: key, checks, latents, late failures
    RUN/units/<label>/<shard>/latents.npz     the latent means of its images (the figures read them)
    RUN/activations/<label>/[<shard>/]        its activation store (a checkpoint with one shard: the store itself)

A part is reused only when its receipt's key equals the key it would be computed under now: checkpoint
sha256, the shard's stimulus fingerprint (ids and file contents), preprocessing, seed, fluency's version and
the plugin's name, version and options hash. A metric reading activations whose part is missing is measured
from the unit's store when that store is complete and was written under the same key (no model pass).

Metrics that need the whole stimulus set (a plugin that overrides ``finish()``, e.g. typicality) are measured
in one more unit per checkpoint, ``whole``, after the shards: it reads the shards' stores in order when they hold
its layers at float32 (``--store-dtype float32``), else runs the model over every image, so sharded and
unsharded runs give the same values.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluency.core.atomic import atomic_path, atomic_write_json
from fluency.core.errors import FluencyError, InputError
from fluency.core.hashing import file_sha256, options_hash
from fluency.core.inputs.images import FolderSource, ImageSource, Preprocessing, subset
from fluency.core.model.checkpoint import LoadedCheckpoint
from fluency.core.model.devices import deterministic, resolve_device
from fluency.core.model.replicates import replicate_of
from fluency.core.plugin.manager import PluginManager, get_plugin_manager, plugin_version
from fluency.core.plugin.metric import FluencyMetric
from fluency.core.run.checkpoints import ModelRef
from fluency.core.run.checks import CheckpointChecks, decodes
from fluency.core.run.config import RunConfig
from fluency.core.run.forward import Measuring, Progress, measure_checkpoint
from fluency.core.run.measuring import CheckpointMetrics, MetricParts
from fluency.core.run.store import MARKER, ActivationStore
from fluency.core.run.tables import part_name
from fluency.core.version import __version__

UNITS = "units"
RECEIPT = "unit.json"
WHOLE = "whole"


@dataclass(frozen=True)
class Shard:
    """The images ``ids`` of shard ``index`` of ``count`` (a checkpoint measured in one piece has one shard)."""

    index: int
    count: int
    ids: tuple[str, ...]

    @property
    def name(self) -> str:
        return "all" if self.count == 1 else f"shard-{self.index:04d}"

    def describe(self) -> str:
        return "all images" if self.count == 1 else f"shard {self.index + 1}/{self.count} ({len(self.ids)} images)"


def shards(ids: Sequence[str], size: int | None) -> list[Shard]:
    """``ids`` cut into shards of ``size`` images in order (None: one shard)."""
    if not size or size >= len(ids):
        return [Shard(0, 1, tuple(ids))]
    pieces = [tuple(ids[start:start + size]) for start in range(0, len(ids), size)]
    return [Shard(i, len(pieces), piece) for i, piece in enumerate(pieces)]


def whole_set(metric: FluencyMetric | type) -> bool:
    """Whether a metric needs the whole stimulus set: its class overrides ``finish()``."""
    cls = metric if isinstance(metric, type) else type(metric)
    return getattr(cls, "finish", FluencyMetric.finish) is not FluencyMetric.finish


@dataclass
class Unit:
    """One task: measure ``metrics`` (plugin -> resolved options) on ``shard`` with the model of ``model``.

    Everything a worker process needs is here (it is pickled to Dask workers): the run folder, the stimuli's
    ``make_source``, the run's settings. ``whole``: the whole-set unit of a sharded checkpoint, reading the
    stores ``shard_stores`` (folder names under ``activations/<label>/``) when they hold its layers."""

    run_dir: Path
    label: str
    model: ModelRef
    shard: Shard
    make_source: Callable[[Preprocessing], ImageSource]
    config: RunConfig
    metrics: dict[str, dict[str, Any]]
    sharded: bool
    whole: bool = False
    shard_stores: tuple[str, ...] = ()
    threads: int | None = None
    force: bool = False

    @property
    def name(self) -> str:
        return WHOLE if self.whole else self.shard.name

    @property
    def key(self) -> str:
        return f"{self.label}/{self.name}"

    @property
    def folder(self) -> Path:
        return self.run_dir / UNITS / self.label / self.name

    @property
    def store_dir(self) -> Path | None:
        if not self.config.store or self.whole:
            return None
        base = self.run_dir / "activations" / self.label
        return base / self.shard.name if self.sharded else base

    def describe(self) -> str:
        what = "the whole-set metrics" if self.whole else self.shard.describe()
        return f"checkpoint {self.label}, {what}"


@dataclass
class UnitResult:
    """What a unit reports back (JSON-ready; also kept in its receipt): ``error`` is one line when it failed."""

    key: str
    label: str
    unit: str
    images: int = 0
    identity: dict[str, Any] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    from_store: list[str] = field(default_factory=list)
    model_pass: bool = False
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # plugin -> {file, columns, options_hash}
    store: dict[str, Any] | None = None
    checks: dict[str, Any] | None = None
    late: dict[str, list[str]] = field(default_factory=dict)  # image id -> [relative path, reason]
    latents: str | None = None
    seconds: float = 0.0
    threads: int = 0
    error: str | None = None
    detail: str | None = None  # the traceback of an unexpected error
    exception: FluencyError | None = field(default=None, repr=False)  # the error itself (not in receipts)


def run_unit(unit: Unit, manager: PluginManager | None = None, progress: Progress | None = None,
             loaded: LoadedCheckpoint | None = None) -> UnitResult:
    """Run one unit, in this process: what a Dask worker calls. A fluency error (bad input, a metric the model
    cannot serve) comes back as ``error``, not raised: retrying it cannot help. Anything else is raised (the
    executor retries it). ``loaded``: the model, when the caller has it already."""
    started, threads = time.perf_counter(), torch.get_num_threads()
    if unit.threads:
        torch.set_num_threads(unit.threads)
    try:
        with deterministic(unit.config.deterministic):  # in a worker process too
            result = UnitResult(unit.key, unit.label, unit.name, threads=torch.get_num_threads())
            try:
                _run(unit, manager or get_plugin_manager(), progress, loaded, result)
            except FluencyError as exc:
                result.error, result.exception = f"{unit.describe()}: {exc}", exc
    finally:
        torch.set_num_threads(threads)  # in-process, the caller's count is restored
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _run(unit: Unit, manager: PluginManager, progress: Progress | None, loaded: LoadedCheckpoint | None,
         result: UnitResult) -> None:
    receipt = _read_json(unit.folder / RECEIPT)
    if loaded is None and receipt is not None and unit.model.recipe is not None:
        loaded = unit.model.load(manager)  # a --model sent by its recipe: its weights' sha256 needs it built
    sha = loaded.sha256 if loaded is not None else _quick_sha(unit.model)
    try:
        base = _base_key(unit, sha, None, receipt) if receipt is not None and sha is not None else None
    except (KeyError, TypeError, ValueError):  # a receipt of another layout: computed again
        base = None
    if unit.force or base is None or base != receipt.get("key"):  # type: ignore[union-attr]
        receipt = None  # --force, or computed under another key (or never): everything again
    missing = {n: o for n, o in unit.metrics.items()
               if unit.force or receipt is None or not _part_valid(unit, n, o, receipt["key"], manager)}
    if receipt is not None and not missing:
        _reused(unit, receipt, manager, result)
        return
    if receipt is not None and _from_store(unit, missing, manager, receipt, result):
        return
    if loaded is None:
        loaded = unit.model.load(manager)
    _model_pass(unit, loaded, missing, manager, progress, receipt, result)


def _quick_sha(model: ModelRef) -> str | None:
    """The checkpoint's sha256 without loading it (None for a model built by --model: known once built)."""
    if model.path is None:
        return model.built.sha256 if model.built is not None else None
    try:
        return file_sha256(model.path)
    except OSError:
        return None


def _base_key(unit: Unit, sha: str, pre: Preprocessing | None, receipt: Mapping[str, Any] | None = None) -> dict:
    """The key of the unit's forward pass: model, the images of its shard and how they were prepared, seed,
    store settings and fluency's version. Without ``pre``, the shard is prepared as ``receipt`` records it."""
    if pre is None:
        pre = Preprocessing(*receipt["key"]["prepare"])  # type: ignore[index]
    source = _shard_source(unit, pre)
    return {"checkpoint_sha256": sha, "stimuli": source.fingerprint(), "prepare": [pre.size, pre.channels, pre.resize],
            "preprocessing": pre.as_dict(), "seed": unit.config.seed,
            "store_dtype": unit.config.store_dtype if unit.config.store else None,
            "store_layers": list(unit.config.store_layers or []), "fluency": __version__}


def _shard_source(unit: Unit, pre: Preprocessing) -> ImageSource:
    return subset(unit.make_source(pre), unit.shard.ids)


def _part_key(unit: Unit, name: str, options: Mapping[str, Any], base: Mapping[str, Any],
              manager: PluginManager) -> dict[str, Any]:
    return {**base, "plugin": name, "plugin_version": plugin_version(manager, "metric", name),
            "options_hash": options_hash(options)}


def _part_valid(unit: Unit, name: str, options: Mapping[str, Any], base: Mapping[str, Any],
                manager: PluginManager) -> bool:
    digest = options_hash(options)
    part = unit.folder / part_name(name, digest)
    receipt = _read_json(part.with_suffix(".json"))
    return part.exists() and receipt is not None and receipt.get("key") == _part_key(unit, name, options, base,
                                                                                     manager)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _reused(unit: Unit, receipt: Mapping[str, Any], manager: PluginManager, result: UnitResult) -> None:
    """Everything of the unit is on disk under the current key: report it from the receipts."""
    _from_receipt(receipt, result)
    result.reused = list(unit.metrics)
    result.parts = {n: _part_record(unit, n, o) for n, o in unit.metrics.items()}


def _from_receipt(receipt: Mapping[str, Any], result: UnitResult) -> None:
    for name in ("images", "identity", "store", "checks", "late", "latents"):
        if name in receipt:
            setattr(result, name, receipt[name])


def _part_record(unit: Unit, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    digest = options_hash(options)
    part = unit.folder / part_name(name, digest)
    receipt = _read_json(part.with_suffix(".json")) or {}
    return {"file": str(part.relative_to(unit.run_dir)), "columns": receipt.get("columns", []),
            "options_hash": digest}


def _measuring(unit: Unit, metrics: Mapping[str, Mapping[str, Any]], manager: PluginManager) -> Measuring:
    specs = {name: manager.get("metric", name) for name in metrics}
    resolved = {("metric", name): dict(options) for name, options in metrics.items()}
    return Measuring(unit.config, specs, resolved, resolve_device(unit.config.device))


def _parts(unit: Unit, measuring: Measuring, manager: PluginManager) -> MetricParts:
    return MetricParts(unit.folder, unit.run_dir.name, manager, measuring.metric_specs, measuring.resolved)


def _publish(unit: Unit, parts: MetricParts, base: Mapping[str, Any], manager: PluginManager,
             result: UnitResult) -> None:
    """Close the parts, then write each one's receipt (a part without a receipt is computed again)."""
    for name in parts.options:
        parts.writer(name)  # a plugin that wrote no rows still gets its (empty) part, so that its receipt holds
    parts.close()
    columns: dict[str, list[str]] = {}
    for column, plugin in parts.columns.items():
        columns.setdefault(plugin, []).append(column)
    for name, options in parts.options.items():
        receipt = {"key": _part_key(unit, name, options, base, manager), "columns": columns.get(name, [])}
        atomic_write_json((unit.folder / part_name(name, options_hash(options))).with_suffix(".json"), receipt)
        result.parts[name] = _part_record(unit, name, options)


def _from_store(unit: Unit, missing: Mapping[str, Any], manager: PluginManager, receipt: Mapping[str, Any],
                result: UnitResult) -> bool:
    """Measure the ``missing`` activation metrics from the unit's complete store, without the model; False when
    the store cannot serve them (a model or image metric, a layer not stored, no store)."""
    store_dir = unit.store_dir
    if store_dir is None or not (store_dir / MARKER).exists():
        return False
    measuring = _measuring(unit, missing, manager)
    if any(spec.needs != "activations" for spec in measuring.metric_specs.values()):
        return False
    store = ActivationStore(store_dir)
    metrics = CheckpointMetrics(manager, measuring.metric_specs, measuring.resolved)
    read = metrics.layers(store.description)
    if any(layer not in store.layers for layer in read) or store.image_ids != list(unit.shard.ids):
        return False
    parts = _parts(unit, measuring, manager)
    _feed_stores(unit, [store], metrics, read, parts)
    _publish(unit, parts, receipt["key"], manager, result)
    _from_receipt(receipt, result)
    result.from_store = list(missing)
    result.reused = [n for n in unit.metrics if n not in missing]
    result.parts = {n: _part_record(unit, n, o) for n, o in unit.metrics.items()}
    return True


def _feed_stores(unit: Unit, stores: Sequence[ActivationStore], metrics: CheckpointMetrics, read: Sequence[str],
                 parts: MetricParts) -> None:
    """The metrics on the layers ``read`` of ``stores``, in order, then their whole-set values and state (an error
    leaves the parts unpublished)."""
    try:
        for store in stores:
            for batch in store.metric_batches(read, unit.config.batch_size):
                batch.seed = unit.config.seed
                metrics.compute(batch, unit.label, parts)
        metrics.finish(unit.label, parts, unit.run_dir / "state" / unit.label)
    except BaseException:
        parts.abort()
        raise


def preprocessing_of(loaded: LoadedCheckpoint) -> Preprocessing:
    """How the model takes images: its input size (None: native) and channels."""
    channels, size, _ = loaded.model.input_shape
    return Preprocessing(size, channels)


def _model_pass(unit: Unit, loaded: LoadedCheckpoint, missing: Mapping[str, Any], manager: PluginManager,
                progress: Progress | None, receipt: Mapping[str, Any] | None, result: UnitResult) -> None:
    """Run the model over the shard for the ``missing`` metrics; with no valid receipt, also write the store,
    the latents and the checks (else those on disk stay)."""
    pre = preprocessing_of(loaded)
    source = _shard_source(unit, pre)
    base = _base_key(unit, loaded.sha256, pre)
    fresh = receipt is None
    measuring = _measuring(unit, missing, manager)
    if unit.whole and unit.shard_stores and _whole_from_stores(unit, measuring, manager, base, result):
        result.identity = identity(loaded)
        atomic_write_json(unit.folder / RECEIPT, {"key": base, "images": result.images, "identity": result.identity})
        return
    checks = CheckpointChecks(loaded, manager, decodes(measuring.metric_specs, unit.config.check_fit)) \
        if fresh and not unit.whole else None
    late: dict[str, list[str]] = {}

    def skip(src: ImageSource, index: int, exc: InputError) -> None:
        if unit.config.strict:
            raise exc
        cause = exc.__cause__
        rel = src.relpath(index) if isinstance(src, FolderSource) else src.ids[index]
        late[src.ids[index]] = [rel, f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)]

    parts = _parts(unit, measuring, manager)
    try:
        latents, store = measure_checkpoint(loaded, source, measuring, parts, unit.store_dir if fresh else None,
                                            unit.run_dir / "state" / unit.label, manager, skip, progress, checks)
    except BaseException:
        parts.abort()
        raise
    _publish(unit, parts, base, manager, result)
    result.model_pass, result.computed = True, list(missing)
    result.reused = [n for n in unit.metrics if n not in missing]
    if not fresh:
        _from_receipt(receipt, result)  # type: ignore[arg-type]
    else:
        result.images, result.identity, result.store, result.late = len(source), identity(loaded), store, late
        result.checks = checks.snapshot() if checks is not None else None
        result.latents = _save_latents(unit, latents) if not unit.whole else None
        atomic_write_json(unit.folder / RECEIPT, {"key": base, **{k: getattr(result, k) for k in (
            "images", "identity", "store", "checks", "late", "latents")}})
    result.parts = {n: _part_record(unit, n, o) for n, o in unit.metrics.items()}


def _whole_from_stores(unit: Unit, measuring: Measuring, manager: PluginManager, base: Mapping[str, Any],
                       result: UnitResult) -> bool:
    """The whole-set unit's metrics read off the shards' stores in order (False: a store lacks a layer)."""
    stores = [ActivationStore(unit.run_dir / "activations" / unit.label / name) for name in unit.shard_stores]
    metrics = CheckpointMetrics(manager, measuring.metric_specs, measuring.resolved)
    if any(spec.needs != "activations" for spec in measuring.metric_specs.values()):
        return False
    read = metrics.layers(stores[0].description)
    if any(layer not in store.layers or store.dtype(layer) != np.float32 for store in stores for layer in read):
        return False  # a float16 store would round what the live pass gives a whole-set metric at float32
    parts = _parts(unit, measuring, manager)
    _feed_stores(unit, stores, metrics, read, parts)
    _publish(unit, parts, base, manager, result)
    result.from_store = list(measuring.metric_specs)
    result.images = sum(len(store.image_ids) for store in stores)
    return True


def identity(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """How the manifest names a measured model: label, file, sha256, architecture (and epoch or weights)."""
    entry = {"label": loaded.label, "path": str(loaded.path.resolve()) if loaded.path is not None else None,
             "sha256": loaded.sha256, "architecture": loaded.info["architecture"]}
    if "weights" in loaded.info:  # built by --model: no checkpoint
        entry.update(model=loaded.info["architecture"]["name"], weights=loaded.info["weights"])
    else:
        entry["epoch"] = loaded.info.get("epoch")
    replicate = replicate_of(loaded.info)
    if replicate is not None:
        entry["replicate"] = replicate
    return entry


def _save_latents(unit: Unit, latents: Any) -> str | None:
    if not len(latents.ids):
        return None
    path = unit.folder / "latents.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.asarray(latents.ids, dtype=str), mu=latents.mu,
                     shape=np.asarray(latents.shape, dtype=np.int64))
    return str(path.relative_to(unit.run_dir))


def failure_detail(exc: BaseException) -> str:
    """The traceback of an unexpected error, for the manifest."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
