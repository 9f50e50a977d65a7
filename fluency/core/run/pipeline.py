"""``fluency run``: checkpoints × stimuli → live activations → metric parts → analyses.

The same function serves the CLI and notebooks (through :func:`fluency.run`, which adds the figures)::

    from fluency.core.run.pipeline import run
    result = run(metrics=["gini", "sam"])          # embedded default
    result.metrics, result.analyses["pearson"], result.strongest(10), result.path

Everything a run writes goes into one folder: ``activations/<checkpoint>/`` (the Parquet
activation store, which ``fluency measure`` reads later), ``metrics/`` (one part per metric
plugin) merged into ``metrics.parquet``, ``analyses/<name>.parquet``, ``ratings.parquet`` and
``manifest.json`` (config, inputs, options, versions, timings, the id-matching report, status).

The run measures from the live capture of each batch; the same batch is written to the store.
It does not draw figures itself: an optional :class:`CheckpointObserver` (the output layer's
model figures) is told about every measured checkpoint while its model is still loaded.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from fluency.core.atomic import claim
from fluency.core.errors import FluencyError, InputError
from fluency.core.inputs.images import FolderSource, ImageSource, Preprocessing, iter_batches
from fluency.core.inputs.raters import RaterRatings
from fluency.core.inputs.ratings import MatchReport
from fluency.core.inputs.stimuli import Stimuli, embedded, from_folder
from fluency.core.model.capture import capture_activations, check_layers
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, LoadedCheckpoint, build_model, check_checkpoint
from fluency.core.model.devices import deterministic, resolve_device, torch_settings
from fluency.core.model.losses import loss_from_config
from fluency.core.plugin.config import read_config, resolve_plugin_options
from fluency.core.plugin.manager import PluginManager, get_plugin_manager, plugin_version
from fluency.core.plugin.metric import MetricBatch, ModelDescription, units_as_rows
from fluency.core.plugin.specs import AnalysisSpec, MetricSpec
from fluency.core.progress import progress_bar, step
from fluency.core.run.analyse import analyse, default_analyses, effects_record
from fluency.core.run.ceiling import load_raters, noise_ceiling
from fluency.core.run.checks import CheckpointChecks, decodes
from fluency.core.run.checkpoints import ModelRef, unique_checkpoints, unique_models
from fluency.core.run.checkpoints import labels as model_labels
from fluency.core.run.config import RunConfig
from fluency.core.run.covariates import Covariates, with_covariates
from fluency.core.run.folder import RunRecord, RunResult, now, outputs, run_folder, versions
from fluency.core.run.ledger import results
from fluency.core.run.measuring import CheckpointMetrics, MetricParts, check_requirements
from fluency.core.run.store import ActivationStoreWriter
from fluency.core.run.tables import MERGED, merge_tables, read_metric_table
from fluency.core.version import __version__

#: --store-layers value that stores every hookable layer
ALL = "all"


class Latents(NamedTuple):
    """The latent means of a stimulus set under one checkpoint: ``ids``, N×k float32 ``mu``, one mean's ``shape``."""

    ids: list[str]
    mu: np.ndarray
    shape: tuple[int, ...]


@dataclass(frozen=True)
class MeasuredCheckpoint:
    """What an observer gets after a checkpoint is measured: the loaded model (on ``device``), the stimuli
    as measured, the latent means read off the measuring pass, and the run folder."""

    loaded: LoadedCheckpoint
    stimuli: Stimuli
    latents: Latents
    out_dir: Path
    device: torch.device
    batch_size: int


#: writes the report of a finished run: ``(run_dir, manifest) -> path`` (the caller holds the folder's lock)
ReportWriter = Callable[[Path, Mapping[str, Any]], Path]


class CheckpointObserver(Protocol):
    """Told about every measured checkpoint (e.g. to draw model figures while the model is loaded)."""

    def start(self, stimuli: Stimuli) -> dict[str, Any]:
        """Check the observer's own settings against the stimuli before any work; returns its manifest entry."""

    def measured(self, checkpoint: MeasuredCheckpoint) -> dict[str, Any]:
        """Handle one checkpoint; returns what the manifest records for it."""


@dataclass(frozen=True)
class RunPlan:
    """A validated run: the stimuli, the plugins and their resolved options, the models to measure."""

    config: RunConfig
    stimuli: Stimuli
    metric_specs: dict[str, MetricSpec]
    analysis_specs: dict[str, AnalysisSpec]
    resolved: dict[tuple[str, str], dict[str, Any]]
    models: list[ModelRef]
    duplicates: list[dict[str, str]]
    device: torch.device
    raters: RaterRatings | None = None  # --rater-ratings, read before any work
    #: None: no covariates (--no-covariates); else whether the user asked for them as a metric too
    covariates_requested: bool | None = None


def plan(config: RunConfig, manager: PluginManager, console: Console) -> RunPlan:
    """Validate everything a run needs before it writes anything: plugins, options, stimuli, models."""
    if config.images is not None:
        out = Path(config.out) if config.out is not None else Path("runs")
        if out.resolve().is_relative_to(Path(config.images).resolve()):
            raise FluencyError(f"--out {out} is inside --images {config.images}: the run's figures would be read as "
                               "stimuli next time; choose an --out outside the image folder")
    if not config.metrics:
        raise FluencyError(f"name at least one --metric (available: {', '.join(manager.names('metric'))})")
    for name in dict.fromkeys(config.metrics):
        manager.get("metric", name)  # an unknown name: one line listing the metrics, before reading any image
    stimuli = embedded() if config.images is None else from_folder(config.images, config.ratings, config.id_column,
                                                                   config.rating_column, config.strict)
    if stimuli.ratings is None and config.analyses:
        raise FluencyError("--analysis needs ratings: pass --ratings TABLE (and --rating-column)")
    paths, model_names, duplicates = _which_models(config, manager, console)
    names = default_analyses(len(paths) + len(model_names)) if config.analyses is None else config.analyses
    analysis_names = list(dict.fromkeys(names)) if stimuli.ratings is not None else []
    analysis_specs = {name: manager.get("analysis", name) for name in analysis_names}
    adjusting = config.covariates and bool(analysis_names)  # the covariates serve the analyses: without, none
    metric_names, requested = with_covariates(config.metrics, adjusting)
    metric_specs = {name: manager.get("metric", name) for name in metric_names}
    used = ([("metric", n) for n in metric_names] + [("analysis", n) for n in analysis_names]
            + [("architecture", n) for n in model_names])
    resolved = resolve_plugin_options(manager, used, config.options, read_config(config.config))
    if config.layers:  # --layers: the layers of every metric that has a `layers` option and was given none
        for name, spec in metric_specs.items():
            if "layers" in spec.options and not resolved[("metric", name)].get("layers"):
                resolved[("metric", name)]["layers"] = list(config.layers)
    labels = model_labels(paths, model_names)
    models = [ModelRef(label, path=path) for path, label in zip(paths, labels)]
    models += [ModelRef(label, built=_built(name, label, resolved, metric_specs, stimuli, config, manager, console))
               for name, label in zip(model_names, labels[len(paths):])]
    return RunPlan(config, stimuli, metric_specs, analysis_specs, resolved, models, duplicates,
                   resolve_device(config.device), raters=load_raters(config, stimuli),
                   covariates_requested=requested if adjusting else None)


def _which_models(config: RunConfig, manager: PluginManager, console: Console
                  ) -> tuple[list[Path], list[str], list[dict[str, str]]]:
    """The checkpoints (each file once, checked) and ``--model`` names (each once, known) a run measures, and
    the notes on repeats; with neither, the embedded default checkpoint."""
    model_names, repeated = unique_models(config.models)
    for name in model_names:
        manager.get("architecture", name)  # an unknown name: one line listing the architectures
    default = not config.checkpoints and not model_names
    if default and not DEFAULT_CHECKPOINT.exists():
        raise FluencyError(f"the embedded default checkpoint {DEFAULT_CHECKPOINT} is missing; reinstall fluency "
                           "or pass --checkpoint")
    paths, duplicates = unique_checkpoints([Path(c) for c in config.checkpoints] or ([DEFAULT_CHECKPOINT] if default
                                                                                     else []))
    for note in [*duplicates, *repeated]:
        console.print(f"[yellow]note:[/yellow] {escape(note['text'])}", highlight=False)
    if config.images is not None and default:
        console.print("[yellow]note:[/yellow] no --checkpoint: using the embedded default model, trained on "
                      "generated shapes at 64×64; train one on images like yours with `fluency train`, or "
                      "measure a pretrained network with --model (e.g. vgg16-imagenet).")
    for path in paths:  # fields, architecture, option bounds, model size: before the run folder is touched
        check_checkpoint(path, manager)
    return paths, model_names, [*duplicates, *repeated]


def _built(name: str, label: str, resolved: dict[tuple[str, str], dict[str, Any]], metric_specs: dict[str, MetricSpec],
           stimuli: Stimuli, config: RunConfig, manager: PluginManager, console: Console) -> LoadedCheckpoint:
    """``--model NAME`` built once, here, and checked against the metrics and the images, so that a missing
    weights file, a bad option, a metric it cannot serve or images of two sizes stop the run before its folder
    exists."""
    built = build_model(name, resolved[("architecture", name)], manager, label, config.seed)
    if built.info["weights"]["kind"] == "untrained":
        console.print(f"[yellow]note:[/yellow] --model {name} has no pretrained weights: measured with "
                      f"untrained weights drawn from --seed {config.seed}", highlight=False)
    check_requirements(metric_specs, built.model, name, label)
    _check_native(built, stimuli)
    return built


def _check_native(loaded: LoadedCheckpoint, stimuli: Stimuli) -> None:
    """A model that takes images at their own size: every image must be of one size (checked from the files'
    headers, before anything is written)."""
    channels, height, _ = loaded.model.input_shape
    if height is None:
        stimuli.make_source(Preprocessing(None, int(channels))).check_one_size()


def run(run_config: RunConfig | None = None, *, observer: CheckpointObserver | None = None,
        report: ReportWriter | None = None, progress: bool = True, manager: PluginManager | None = None,
        console: Console | None = None, **settings: Any) -> RunResult:
    """Compute the metrics for every image and checkpoint, then run the analyses against the ratings.

    Takes a :class:`RunConfig` or its fields as keyword arguments (``metrics=["gini"], images=...``).
    With neither ``images`` nor ``checkpoints`` it uses the embedded default. ``options`` are
    ``[KIND.]PLUGIN.KEY=VALUE`` strings as for ``-o``. ``report`` writes the report as the run's last step
    (the run is ``complete`` only once it is written). Returns a :class:`RunResult`.
    """
    if run_config is not None and settings:
        raise FluencyError(f"pass a RunConfig or settings, not both ({sorted(settings)})")
    config = run_config or RunConfig.create(**settings)
    started = time.perf_counter()
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True, quiet=not progress)
    the_plan = plan(config, manager, console)
    figures = observer.start(the_plan.stimuli) if observer is not None else None  # its errors come before any work
    if config.overwrite and config.out is not None and results(Path(config.out)):
        preflight(the_plan, manager)  # the previous run is removed only once this one is known to start
    with run_folder(config.out, config.overwrite, "fluency run", console) as out_dir, \
            deterministic(config.deterministic):
        used = [("metric", n) for n in the_plan.metric_specs] + [("analysis", n) for n in the_plan.analysis_specs]
        record = RunRecord(out_dir, {
            "run_id": out_dir.name, "status": "running", "started": now(),
            "command": sys.argv if Path(sys.argv[0]).name == "fluency" else None, "config": config.as_dict(),
            "inputs": {"stimuli": the_plan.stimuli.description, "duplicate_checkpoints": the_plan.duplicates},
            "metrics": list(the_plan.metric_specs), "analyses": list(the_plan.analysis_specs),
            "analysis_effects": effects_record(the_plan.analysis_specs),
            "options": {f"{k}.{n}": v for (k, n), v in the_plan.resolved.items()},
            "device": str(the_plan.device), "torch_settings": torch_settings(), "versions": versions(manager, used),
            "matching": the_plan.stimuli.report.as_dict() if the_plan.stimuli.report is not None else None,
            "unreadable_images": dict(the_plan.stimuli.unreadable), "warnings": [],
            **({"figures": {**figures, "checkpoints": {}}} if figures is not None else {}),
        })
        record.write()
        try:
            return _run(the_plan, record, manager, console, observer, report, started)
        except BaseException as exc:
            record.failed(exc, time.perf_counter() - started)
            raise


def _run(the_plan: RunPlan, record: RunRecord, manager: PluginManager, console: Console,
         observer: CheckpointObserver | None, report: ReportWriter | None, started: float) -> RunResult:
    """The run proper: measure every checkpoint, merge the parts, analyse; each step recorded in ``record``."""
    config, stimuli, out_dir = the_plan.config, the_plan.stimuli, record.run_dir
    unreadable = dict(stimuli.unreadable)  # relative path -> reason; grows if a file fails while measuring
    late: dict[str, str] = {}  # image id -> relative path, for files that failed while measuring

    def skip_image(source: ImageSource, index: int, exc: InputError) -> None:
        """A file that passed the up-front check but failed to load: leave it out (``strict``: stop)."""
        if config.strict:
            raise exc
        cause, image_id = exc.__cause__, source.ids[index]
        rel = source.relpath(index) if isinstance(source, FolderSource) else image_id
        unreadable[rel] = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        late[image_id] = rel
        record.set(unreadable_images=dict(unreadable))
        console.print(f"[yellow]warning:[/yellow] {escape(str(exc))}; left out", highlight=False)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    parts = MetricParts(out_dir, out_dir.name, manager, the_plan.metric_specs, the_plan.resolved)
    checkpoints: list[dict[str, Any]] = []
    try:
        with progress_bar(console) as bars:
            for ref in the_plan.models:
                t0 = time.perf_counter()  # the bar shows from the start, while the model loads
                task = bars.add_task(step("metrics", ref.label), total=None, status="loading the model")
                loaded, label = ref.load(manager), ref.label
                checkpoints.append(_identity(loaded))
                record.set(inputs={**record.data["inputs"], "checkpoints": list(checkpoints)})
                checks = CheckpointChecks(loaded, manager, decodes(the_plan.metric_specs, config.check_fit))
                latents, store = measure_checkpoint(loaded, stimuli, the_plan, parts, out_dir, manager, bars,
                                                    skip_image, task, checks)
                if store is not None:
                    record.entry("stores", label, store)
                if late:  # later steps and checkpoints do not try them again
                    stimuli = _without(stimuli, late)
                record.timing(f"metrics[{label}]", time.perf_counter() - t0)
                if observer is not None:
                    t0 = time.perf_counter()
                    bars.update(task, status="drawing the figures")
                    done = MeasuredCheckpoint(loaded, stimuli, latents, out_dir, the_plan.device, config.batch_size)
                    figures = record.data["figures"]
                    record.set(figures={**figures, "checkpoints": {**figures["checkpoints"],
                                                                   label: observer.measured(done)}})
                    record.timing(f"figures[{label}]", time.perf_counter() - t0)
                    bars.update(task, status="")
                found = checks.warnings(out_dir / "figures" / f"recon-{label}.png")
                record.set(warnings=[*record.data.get("warnings", []), *found])
    except BaseException:
        parts.abort()
        raise
    parts.close()
    record.set(metric_parts=[parts.record(name) for name in the_plan.metric_specs if name in parts.writers],
               metric_columns=parts.metric_columns())
    merge_tables(parts.files(), out_dir / MERGED, drop_ids=list(late))  # late failures: out of every checkpoint
    if late and stimuli.report is not None:
        stimuli = replace(stimuli, report=_report_late(stimuli.report, late, unreadable))
        record.set(matching=stimuli.report.as_dict())
    metric_table = read_metric_table(out_dir / MERGED)
    covariates = None if the_plan.covariates_requested is None else \
        Covariates.of(parts.metric_columns(), the_plan.covariates_requested)
    if covariates is not None:
        record.set(covariates=covariates.record())
    t0 = time.perf_counter()
    outcome = analyse(metric_table, stimuli.ratings, stimuli.rating_column, the_plan.analysis_specs, the_plan.resolved,
                      out_dir, manager, config.by, config.min_group_size, console, covariates)
    if outcome.subgroups is not None:
        record.set(subgroups=outcome.subgroups)
    for name, seconds in outcome.timings.items():
        record.timing(name, seconds)
    record.timing("analyses", time.perf_counter() - t0)
    if the_plan.raters is not None:
        t0 = time.perf_counter()
        record.set(reliability=noise_ceiling(the_plan.raters, stimuli, config, out_dir))
        record.timing("reliability", time.perf_counter() - t0)
    if report is not None:
        _write_report(report, record, console)
    record.timing("total", time.perf_counter() - started)
    record.set(status="complete", finished=now(), outputs=outputs(out_dir))
    record.write()
    return RunResult(out_dir, metric_table, outcome.results, record.data, stimuli.report, dict(unreadable))


def _write_report(report: ReportWriter, record: RunRecord, console: Console) -> None:
    """The report, the run's last step: written from the manifest it will have once complete. Until then the
    run is not ``complete``: stopped here (Ctrl-C, an error), the manifest says so and the user is told how to
    write the report from the finished results."""
    t0 = time.perf_counter()
    with progress_bar(console) as bars:
        task = bars.add_task(step("report", record.run_dir.name), total=1, status="writing report.html")
        try:
            report(record.run_dir, {**record.data, "status": "complete", "finished": now()})
            bars.update(task, advance=1, status="")
        except BaseException:
            record.set(report_pending=True)
            console.print(f"[yellow]note:[/yellow] the results are complete but report.html was not written; "
                          f"write it with: fluency report {escape(str(record.run_dir))}", highlight=False)
            raise
    record.timing("report", time.perf_counter() - t0)


def _identity(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """How the manifest names a measured model: label, file, sha256, architecture (and epoch or weights)."""
    entry = {"label": loaded.label, "path": str(loaded.path.resolve()) if loaded.path is not None else None,
             "sha256": loaded.sha256, "architecture": loaded.info["architecture"]}
    if "weights" in loaded.info:  # built by --model: no checkpoint
        entry.update(model=loaded.info["architecture"]["name"], weights=loaded.info["weights"])
    else:
        entry["epoch"] = loaded.info.get("epoch")
    return entry


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


def measure_checkpoint(loaded: LoadedCheckpoint, stimuli: Stimuli, the_plan: RunPlan, parts: MetricParts,
                       out_dir: Path, manager: PluginManager, bars: Any,
                       on_error: Callable[[ImageSource, int, InputError], None] | None = None,
                       task: Any = None, checks: CheckpointChecks | None = None
                       ) -> tuple[Latents, dict[str, Any] | None]:
    """Stream the stimuli through one checkpoint, feeding the store and every metric batch by batch.

    ``on_error(source, index, error)`` is called for an image that fails to load (default: raise); ``task``:
    the progress task to advance (default: a new one); ``checks`` are fed every batch's output and activations
    (:mod:`fluency.core.run.checks`), its constrained layers captured too.
    Returns the latent means μ read off the same forward passes (the figures need them; a second pass
    would decode every file again) and the manifest's description of the store written (or None).
    """
    config = the_plan.config
    model, description, metrics, read, stored = _checked(loaded, the_plan, manager)
    capture = list(dict.fromkeys([*read, *stored, *(checks.layers if checks is not None else [])]))
    channels, size, _ = model.input_shape
    source = stimuli.make_source(Preprocessing(size, channels))
    loss = loss_from_config(model, loaded.info.get("loss", {}), loaded.label)
    writer = _store_writer(out_dir, loaded, description, source, the_plan, manager) if stored else None
    if task is None:
        task = bars.add_task(step("metrics", loaded.label), total=len(source), status="")
    bars.update(task, total=len(source), status="")
    latent_ids: list[str] = []
    latent_parts: list[np.ndarray] = []
    mu_shape: tuple[int, ...] = ()
    room_checked = False
    try:
        skip = None if on_error is None else (lambda index, exc: on_error(source, index, exc))
        for ids, x in iter_batches(source, config.batch_size, on_error=skip):
            x = x.to(the_plan.device)
            with torch.no_grad(), capture_activations(model, capture) as acts:
                output = model(x, sample=False)
                mu = model.latent(output)
            if mu is not None:
                latent_ids += ids
                latent_parts.append(mu.flatten(1).float().cpu().numpy())
                mu_shape = tuple(mu.shape[1:])
            acts = {k: v.float() for k, v in acts.items()}
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
            metrics.compute(batch, loaded.label, parts, lambda name: bars.update(task, status=name))
            bars.update(task, advance=len(ids), status="")
        metrics.finish(loaded.label, parts, out_dir / "state" / loaded.label)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    store = None
    if writer is not None:
        writer.close()
        store = {"path": str(writer.path.relative_to(out_dir)), "layers": stored, "dtype": config.store_dtype}
        if writer.widened:  # float16 overflow: those layers went to float32 (store.py)
            store["widened"] = writer.widened
            for note in writer.notes:
                bars.console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    mu_all = np.concatenate(latent_parts) if latent_parts else np.zeros((0, 0), np.float32)
    return Latents(latent_ids, mu_all, mu_shape), store


def _checked(loaded: LoadedCheckpoint, the_plan: RunPlan, manager: PluginManager
             ) -> tuple[Any, ModelDescription, CheckpointMetrics, list[str], list[str]]:
    """One checkpoint's model (on the device, in eval mode), description and metric instances, with the layers
    the metrics read and the store keeps, every layer checked against the model."""
    model = loaded.model.to(the_plan.device).eval()
    check_requirements(the_plan.metric_specs, model, loaded.architecture, loaded.label)
    description = ModelDescription.of(model, loaded.architecture, loaded.label, loaded.sha256)
    metrics = CheckpointMetrics(manager, the_plan.metric_specs, the_plan.resolved)
    read = metrics.layers(description)
    check_layers(model, read)
    return model, description, metrics, read, stored_layers(the_plan.config, read, description, model)


def preflight(the_plan: RunPlan, manager: PluginManager) -> None:
    """Build every checkpoint's model and check the metrics' needs and layers against it, writing nothing: what
    ``--overwrite`` does before it removes a previous run, so that a typo (a layer name) keeps that run."""
    for ref in the_plan.models:
        _checked(ref.load(manager), the_plan, manager)


def _store_writer(out_dir: Path, loaded: LoadedCheckpoint, description: ModelDescription, source: ImageSource,
                  the_plan: RunPlan, manager: PluginManager) -> ActivationStoreWriter:
    folder = out_dir / "activations" / loaded.label
    claim(folder, whole_folder=True)  # the store is the run's as a whole: its writer names the files inside
    provenance = {"source": "run", "fluency_version": __version__, "checkpoint": loaded.label,
                  "checkpoint_sha256": loaded.sha256, "stimulus_fingerprint": source.fingerprint(),
                  "preprocessing": source.describe(), "seed": the_plan.config.seed,
                  "plugin_versions": {name: plugin_version(manager, "metric", name) for name in the_plan.metric_specs}}
    return ActivationStoreWriter(folder, dtype=the_plan.config.store_dtype,
                                 provenance=provenance, model=description, overwrite=True)


def _check_finite(acts: dict[str, torch.Tensor], ids: Sequence[str], label: str) -> None:
    for layer, tensor in acts.items():
        finite = torch.isfinite(units_as_rows(tensor)).all(dim=1)
        if not bool(finite.all()):
            bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
            raise FluencyError(f"checkpoint {label}: NaN/Inf activations in layer {layer!r} for images {bad[:10]}"
                               f"{' and more' if len(bad) > 10 else ''}")


def _without(stimuli: Stimuli, late: dict[str, str]) -> Stimuli:
    """``stimuli`` without the images (ids in ``late``) that failed to load: in its source and its ratings."""
    make, skip = stimuli.make_source, set(late)

    def make_source(pre: Preprocessing) -> ImageSource:
        source = make(pre)
        if isinstance(source, FolderSource) and skip & set(source.ids):
            return FolderSource(source.root, {i: p for i, p in zip(source.ids, source.paths) if i not in skip}, pre)
        return source

    ratings = stimuli.ratings
    if ratings is not None:
        ratings = ratings[~ratings["image_id"].isin(list(skip))].reset_index(drop=True)
    return replace(stimuli, make_source=make_source, ratings=ratings)


def _report_late(report: MatchReport, late: dict[str, str], unreadable: dict[str, str]) -> MatchReport:
    """A copy of ``report`` with the images that failed to load (``late``: id -> relative path) moved to its
    unreadable lists."""
    report = copy.deepcopy(report)
    for image_id, rel in late.items():
        report.unreadable_images[rel] = unreadable[rel]
        if report.matched.pop(image_id, None) is not None:
            report.unreadable_ids.append(image_id)
        elif rel in report.unrated_images:
            report.unrated_images.remove(rel)
    return report


