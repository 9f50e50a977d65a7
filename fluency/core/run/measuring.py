"""Feeding metric plugins: one step shared by ``fluency run`` (live capture) and ``fluency measure`` (a store).

:class:`MetricParts` owns the run's metric-table parts (one per plugin, see
:mod:`fluency.core.run.tables`); :class:`CheckpointMetrics` holds the metric instances that
measure one checkpoint, feeds them batches from any activation source and writes what they
return. Both paths go through here, so the same batch gives the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fluency.core.atomic import atomic_path
from fluency.core.errors import FluencyError, PluginFailure
from fluency.core.model.losses import LossUnavailable
from fluency.core.hashing import options_hash
from fluency.core.plugin.architecture import missing_capabilities
from fluency.core.plugin.manager import PluginManager, guarded, plugin_version
from fluency.core.plugin.metric import FluencyMetric, MetricBatch, MetricValues, ModelDescription
from fluency.core.plugin.specs import MetricSpec
from fluency.core.run.tables import MetricTableWriter, part_name

Resolved = Mapping[tuple[str, str], Mapping[str, Any]]


def column_clash(manager: PluginManager, column: str, first: str, second: str) -> PluginFailure:
    """Two metric plugins writing the same metric column: their rows would be mixed in every analysis."""
    return PluginFailure(f"metric plugins {first!r} ({plugin_version(manager, 'metric', first)}) and {second!r} "
                        f"({plugin_version(manager, 'metric', second)}) both write the metric column {column!r}; "
                        "their rows would be mixed: measure one of them, or rename the other's column")


#: how a missing capability is named in errors
_CAPABILITY_WORDS = {"decoder": "a decoder", "latent": "a latent code", "objective": "a training objective",
                     "inverse": "an exact inverse"}


#: how messages name each kind of model
_KIND_WORDS = {"vae": "a VAE", "flow": "a flow model", "encoder": "an encoder-only model"}


def check_requirements(specs: Mapping[str, MetricSpec], model: Any, architecture: str, label: str) -> None:
    """Stop, naming metric, model and what is missing, if a metric requires a capability the model lacks."""
    for name, spec in specs.items():
        missing = missing_capabilities(model, spec.requires)
        if missing:
            kind = _KIND_WORDS.get(getattr(model, "kind", ""), "a model")
            needed = " and ".join(_CAPABILITY_WORDS[m] for m in missing)
            what = (f"model {label!r} is {kind}" if label == architecture else
                    f"checkpoint {label!r} is {architecture!r}, {kind}")
            raise FluencyError(f"metric {name!r} needs a model with {needed}; {what} without: measure it with "
                               "other metrics or choose another model")


class MetricParts:
    """The metric-table parts of one run: ``metrics/<plugin>-<options hash>.parquet``, opened on first use."""

    def __init__(self, out_dir: Path, run_id: str, manager: PluginManager, specs: Mapping[str, MetricSpec],
                 resolved: Resolved) -> None:
        self.out_dir, self.run_id, self.manager, self.specs = out_dir, run_id, manager, dict(specs)
        self.options = {name: dict(resolved[("metric", name)]) for name in specs}
        self.writers: dict[str, MetricTableWriter] = {}
        self.columns: dict[str, str] = {}  # metric column -> the plugin that wrote it

    def record(self, plugin: str) -> dict[str, Any]:
        """The manifest's description of a plugin's part."""
        digest = options_hash(self.options[plugin])
        return {"plugin": plugin, "plugin_version": plugin_version(self.manager, "metric", plugin),
                "options_hash": digest, "options": self.options[plugin], "file": part_name(plugin, digest)}

    def writer(self, plugin: str) -> MetricTableWriter:
        """The part of ``plugin``, opened on first use (a part with no rows is a valid, empty table)."""
        writer = self.writers.get(plugin)
        if writer is None:
            info = self.record(plugin)
            writer = self.writers[plugin] = MetricTableWriter(
                self.out_dir / info["file"], self.run_id, plugin=plugin, plugin_version=info["plugin_version"],
                options_hash=info["options_hash"])
        return writer

    def write(self, plugin: str, checkpoint: str, image_ids: Sequence[str], values: MetricValues) -> None:
        writer = self.writer(plugin)
        owner = self.columns.setdefault(values.metric, plugin)
        if owner != plugin:
            raise column_clash(self.manager, values.metric, owner, plugin)
        writer.write(checkpoint, values.metric, values.layer, image_ids, values.as_numpy())

    def metric_columns(self) -> dict[str, dict[str, Any]]:
        """``{metric column: {"plugin", "higher_is_more_fluent"}}``, the direction read from the spec."""
        return {column: {"plugin": plugin, "higher_is_more_fluent": self.specs[plugin].higher_is_more_fluent}
                for column, plugin in self.columns.items()}

    def files(self) -> list[Path]:
        """The parts written, in the order of the requested metrics."""
        return [self.writers[name].path for name in self.specs if name in self.writers]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


class CheckpointMetrics:
    """The metric instances measuring one checkpoint (fresh per checkpoint: some collect state)."""

    def __init__(self, manager: PluginManager, specs: Mapping[str, MetricSpec], resolved: Resolved) -> None:
        self.manager, self.specs = manager, dict(specs)
        self.instances: dict[str, FluencyMetric] = {
            name: guarded(manager, "metric", name, lambda s=spec, n=name: s.load()(**resolved[("metric", n)]))
            for name, spec in specs.items()}

    def layers(self, model: ModelDescription | Any) -> list[str]:
        """Every layer any of the metrics reads, in first-use order."""
        names: list[str] = []
        for name, metric in self.instances.items():
            if self.specs[name].reads_activations:
                names += guarded(self.manager, "metric", name, lambda m=metric: m.layers(model))
        return list(dict.fromkeys(names))

    def compute(self, batch: MetricBatch, checkpoint: str, parts: MetricParts,
                on_metric: Any = None) -> None:
        """Every metric on ``batch``; model-free metrics get no ``loss`` (``on_metric(name)`` before each)."""
        for name, metric in self.instances.items():
            if on_metric is not None:
                on_metric(name)
            own = batch if self.specs[name].needs == "model" or batch.loss is None else _without_loss(batch)
            try:
                if own.loss is not None and hasattr(own.loss, "build"):
                    own.loss.build()  # outside the metric: SAM may call the loss inside vmap
                returned = guarded(self.manager, "metric", name, lambda m=metric, b=own: m.compute(b))
            except LossUnavailable as exc:
                raise FluencyError(f"metric {name!r} needs {exc}") from None
            for values in self._checked(name, "compute()", returned):
                self._write(parts, name, checkpoint, batch.image_ids, values)

    def finish(self, checkpoint: str, parts: MetricParts, state_dir: Path) -> None:
        """Values that need the whole set, and each metric's fitted state (``state_dir/<metric>.pt``)."""
        for name, metric in self.instances.items():
            finished = guarded(self.manager, "metric", name, metric.finish)
            state = guarded(self.manager, "metric", name, metric.state)
            if state is not None:  # fitted state (e.g. typicality's Gaussians), saved for reuse
                path = state_dir / f"{name}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    torch.save(state, tmp)
            for pair in self._checked(name, "finish()", finished, pairs=True):
                self._write(parts, name, checkpoint, pair[0], pair[1])

    def _broken(self, name: str, what: str) -> PluginFailure:
        return PluginFailure(f"metric {name!r} ({plugin_version(self.manager, 'metric', name)}) broke its contract: "
                            f"{what}")

    def _checked(self, name: str, call: str, returned: Any, pairs: bool = False) -> list[Any]:
        """What ``compute()``/``finish()`` returned, if it has the contract's shape; else one line naming the plugin."""
        expected = "a list of (image_ids, MetricValues) pairs" if pairs else "a list of MetricValues"
        if not isinstance(returned, (list, tuple)):
            raise self._broken(name, f"{call} returned {type(returned).__name__}, expected {expected}")
        for item in returned:
            values = item[1] if pairs and isinstance(item, (list, tuple)) and len(item) == 2 else item
            if not isinstance(values, MetricValues):
                raise self._broken(name, f"{call} returned a {type(item).__name__} in its list, expected {expected}")
        return list(returned)

    def _write(self, parts: MetricParts, name: str, checkpoint: str, ids: Sequence[str], values: MetricValues) -> None:
        try:
            numbers = values.as_numpy()
        except (TypeError, ValueError) as exc:
            raise self._broken(name, f"the values of {values.metric!r} are not numbers ({exc})") from None
        if len(numbers) != len(ids):
            raise self._broken(name, f"{len(numbers)} values of {values.metric!r} (layer {values.layer!r}) for "
                                     f"{len(ids)} images; give one value per image")
        parts.write(name, checkpoint, ids, values)


def _without_loss(batch: MetricBatch) -> MetricBatch:
    return MetricBatch(batch.image_ids, batch.images, batch.activations, batch.model, None, batch.seed,
                       batch.description)
