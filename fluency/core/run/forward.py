"""One forward pass of a stimulus set (or shard) through one checkpoint, feeding the store and the metrics.

The engine a unit of work (:mod:`fluency.core.run.units`) runs: batch by batch, the model's captured
activations go to the activation store and to every metric; the same pass yields the latent means the
figures need and the numbers of the checkpoint's checks (:mod:`fluency.core.run.checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fluency.core.atomic import claim
from fluency.core.errors import FluencyError, InputError
from fluency.core.inputs.images import ImageSource, iter_batches
from fluency.core.memory import HeapTrimmer, release_memory
from fluency.core.model.capture import capture_activations, check_layers
from fluency.core.model.checkpoint import LoadedCheckpoint
from fluency.core.model.losses import loss_from_config
from fluency.core.plugin.architecture import FluencyVAE, VAEOutput
from fluency.core.plugin.manager import PluginManager, plugin_version
from fluency.core.plugin.metric import MetricBatch, ModelDescription, units_as_rows
from fluency.core.plugin.specs import MetricSpec
from fluency.core.run.checks import CheckpointChecks
from fluency.core.run.config import RunConfig
from fluency.core.run.measuring import CheckpointMetrics, MetricParts, check_requirements
from fluency.core.run.store import ActivationStoreWriter
from fluency.core.version import __version__

#: --store-layers value that stores every hookable layer
ALL = "all"


class Latents(NamedTuple):
    """The latent means of a stimulus set under one checkpoint: ``ids``, N×k float32 ``mu``, one mean's ``shape``."""

    ids: list[str]
    mu: np.ndarray
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Measuring:
    """What a forward pass measures: the run's settings, the metric plugins with their resolved options, the
    device."""

    config: RunConfig
    metric_specs: Mapping[str, MetricSpec]
    resolved: Mapping[tuple[str, str], Mapping[str, Any]]
    device: torch.device


#: told the number of images of every finished batch and the step under way (a metric's name, or "")
Progress = Callable[[int, str], None]


def stored_layers(config: RunConfig, read: Sequence[str], description: ModelDescription,
                  model: Any) -> list[str]:
    """The layers the store keeps: --store-layers, else what the metrics read plus the model's defaults."""
    if not config.store:
        return []
    if config.store_layers is None:
        return list(dict.fromkeys([*read, *description.default_metric_layers]))
    if list(config.store_layers) == [ALL]:
        return list(model.hookable_layers())
    check_layers(model, config.store_layers)
    return list(dict.fromkeys(config.store_layers))


def measure_checkpoint(loaded: LoadedCheckpoint, source: ImageSource, measuring: Measuring, parts: MetricParts,
                       store_dir: Path | None, state_dir: Path, manager: PluginManager,
                       on_error: Callable[[ImageSource, int, InputError], None] | None = None,
                       progress: Progress | None = None, checks: CheckpointChecks | None = None
                       ) -> tuple[Latents, dict[str, Any] | None]:
    """Stream ``source`` through one checkpoint, feeding the store (into ``store_dir``; None: no store) and every
    metric of ``measuring`` batch by batch; whole-set values and fitted state (``state_dir``) at the end.

    ``on_error(source, index, error)`` is called for an image that fails to load (default: raise); ``checks``
    are fed every batch's output and activations, its constrained layers captured too.
    Returns the latent means μ read off the same forward passes and the store's description (or None).
    """
    config = measuring.config
    model, description, metrics, read, stored = checked_model(loaded, measuring, manager)
    stored = stored if store_dir is not None else []
    capture = list(dict.fromkeys([*read, *stored, *(checks.layers if checks is not None else [])]))
    loss = loss_from_config(model, loaded.info.get("loss", {}), loaded.label)
    writer = _store_writer(store_dir, loaded, description, source, measuring, manager) if stored else None
    latent_ids: list[str] = []
    latent_mu: np.ndarray | None = None  # allocated once (N×k): per-batch parts kept alive fragment the heap
    mu_shape: tuple[int, ...] = ()
    room_checked = False
    step = (lambda name: progress(0, name)) if progress is not None else None
    encoder_only = encodes_alone(model) and not (checks is not None and checks.fit)
    trimmer = HeapTrimmer()  # batch-sized tensors fragment glibc's heap over a long pass (core/memory.py)
    release_memory()  # what reading the stimuli and planning freed (66 MiB at 100,000 images), before the batches
    try:
        skip = None if on_error is None else (lambda index, exc: on_error(source, index, exc))
        for ids, x in iter_batches(source, config.batch_size, on_error=skip):
            x = x.to(measuring.device)
            output, acts, encoder_only = _forward(model, x, capture, encoder_only)
            mu = model.latent(output)
            if mu is not None:
                flat = mu.flatten(1).float().cpu().numpy()
                if latent_mu is None:
                    latent_mu = np.empty((len(source), flat.shape[1]), np.float32)
                latent_mu[len(latent_ids):len(latent_ids) + len(ids)] = flat
                latent_ids += ids
                mu_shape = tuple(mu.shape[1:])
            _check_finite(acts, ids, loaded.label)
            if checks is not None:
                with torch.no_grad():
                    checks.add(output, x, acts, loss)
            for layer in stored:
                writer.write(layer, ids, acts[layer])  # type: ignore[union-attr]
            if stored and not room_checked:  # after the first batch: will the whole store fit?
                writer.check_room(len(source))  # type: ignore[union-attr]
                room_checked = True
            batch = MetricBatch(ids, x, {k: acts[k] for k in read}, model, loss, config.seed, description)
            metrics.compute(batch, loaded.label, parts, step)
            trimmer.tick()
            if progress is not None:
                progress(len(ids), "")
        metrics.finish(loaded.label, parts, state_dir)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    mu_all = latent_mu[:len(latent_ids)] if latent_mu is not None else np.zeros((0, 0), np.float32)
    return Latents(latent_ids, mu_all, mu_shape), _closed(writer, stored, config)


def encodes_alone(model: Any) -> bool:
    """Whether a measuring pass may stop after the encoder: a VAE whose forward pass is the base class's
    (encode, then decode), so the encoder alone yields the same μ, log σ² and encoder activations."""
    return isinstance(model, FluencyVAE) and type(model).forward is FluencyVAE.forward


def _forward(model: Any, x: torch.Tensor, capture: Sequence[str], encoder_only: bool
             ) -> tuple[Any, dict[str, torch.Tensor], bool]:
    """One batch's pass with ``capture`` recorded: the encoder alone when ``encoder_only`` (nothing read from
    the decoder: its output has no reconstruction), else the whole model. A captured layer that the encoder
    did not reach (a decoder layer) turns ``encoder_only`` off for this batch and the rest. Returns the
    output, the activations as float32 and whether the pass stopped after the encoder."""
    with torch.no_grad(), capture_activations(model, capture) as acts:
        if encoder_only:
            mu, logvar = model.encode(x)
            output = VAEOutput(None, mu, logvar, mu)  # type: ignore[arg-type] - not decoded: no reconstruction
        if not encoder_only or len(acts) < len(capture):
            encoder_only = False
            acts.clear()
            output = model(x, sample=False)
    return output, {k: v.float() for k, v in acts.items()}, encoder_only


def _closed(writer: ActivationStoreWriter | None, stored: list[str], config: RunConfig) -> dict[str, Any] | None:
    """Close the store and describe it for the manifest (its notes: layers widened to float32)."""
    if writer is None:
        return None
    writer.close()
    store: dict[str, Any] = {"layers": stored, "dtype": config.store_dtype}
    if writer.widened:  # float16 overflow: those layers went to float32 (store.py)
        store["widened"] = writer.widened
        store["notes"] = list(writer.notes)
    return store


def checked_model(loaded: LoadedCheckpoint, measuring: Measuring, manager: PluginManager
                  ) -> tuple[Any, ModelDescription, CheckpointMetrics, list[str], list[str]]:
    """One checkpoint's model (on the device, in eval mode), description and metric instances, with the layers
    the metrics read and the store keeps, every layer checked against the model."""
    model = loaded.model.to(measuring.device).eval()
    check_requirements(measuring.metric_specs, model, loaded.architecture, loaded.label)
    description = ModelDescription.of(model, loaded.architecture, loaded.label, loaded.sha256)
    metrics = CheckpointMetrics(manager, measuring.metric_specs, measuring.resolved)
    read = metrics.layers(description)
    check_layers(model, read)
    return model, description, metrics, read, stored_layers(measuring.config, read, description, model)


def _store_writer(folder: Path, loaded: LoadedCheckpoint, description: ModelDescription, source: ImageSource,
                  measuring: Measuring, manager: PluginManager) -> ActivationStoreWriter:
    claim(folder, whole_folder=True)  # the store is the run's as a whole: its writer names the files inside
    provenance = {"source": "run", "fluency_version": __version__, "checkpoint": loaded.label,
                  "checkpoint_sha256": loaded.sha256, "stimulus_fingerprint": source.fingerprint(),
                  "preprocessing": source.describe(), "seed": measuring.config.seed,
                  "plugin_versions": {name: plugin_version(manager, "metric", name) for name in measuring.metric_specs}}
    return ActivationStoreWriter(folder, dtype=measuring.config.store_dtype,
                                 provenance=provenance, model=description, overwrite=True)


def _check_finite(acts: dict[str, torch.Tensor], ids: Sequence[str], label: str) -> None:
    """One line naming the layer and images with a NaN or ±Inf activation. A layer whose sum is finite has
    none (NaN and Inf propagate through a sum), so the per-image test runs only on a non-finite sum."""
    for layer, tensor in acts.items():
        if bool(torch.isfinite(tensor.sum())):
            continue
        finite = torch.isfinite(units_as_rows(tensor)).all(dim=1)
        if not bool(finite.all()):
            bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
            raise FluencyError(f"checkpoint {label}: NaN/Inf activations in layer {layer!r} for images {bad[:10]}"
                               f"{' and more' if len(bad) > 10 else ''}")
