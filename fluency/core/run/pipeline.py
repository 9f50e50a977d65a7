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
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from fluency.core.errors import FluencyError
from fluency.core.inputs.images import FolderSource, ImageSource, Preprocessing
from fluency.core.inputs.raters import RaterRatings
from fluency.core.inputs.ratings import MatchReport
from fluency.core.inputs.stimuli import Stimuli, embedded, from_folder
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, LoadedCheckpoint, build_model, check_checkpoint
from fluency.core.model.devices import deterministic, resolve_device, torch_settings
from fluency.core.plugin.config import read_config, resolve_plugin_options
from fluency.core.plugin.manager import PluginManager, get_plugin_manager
from fluency.core.plugin.specs import AnalysisSpec, MetricSpec
from fluency.core.progress import progress_bar, step
from fluency.core.run.analyse import analyse, default_analyses, effects_record
from fluency.core.run.batch import (Outcome, claim_units, counts, execute, gather_parts, late_failures, latents,
                                    plan_units, portable, raise_failure, seconds_per_label, store_record,
                                    unit_records, warnings_of, whole_set_metrics)
from fluency.core.run.ceiling import load_raters, noise_ceiling
from fluency.core.run.checkpoints import ModelRef, expand_checkpoints, unique_checkpoints, unique_models
from fluency.core.run.checkpoints import labels as model_labels
from fluency.core.run.config import RunConfig
from fluency.core.run.covariates import Covariates, with_covariates
from fluency.core.run.executors import Executor, ExecutorSettings, open_executor
from fluency.core.run.replicates import write_replicates
from fluency.core.run.slurm import slurm_options
from fluency.core.run.groups import check_columns, checkpoint_group, group_image_ids, matched_label
from fluency.core.run.folder import MANIFEST, RunRecord, RunResult, now, outputs, read_manifest, run_folder, versions
from fluency.core.run.forward import ALL, Latents, Measuring, checked_model, stored_layers
from fluency.core.run.ledger import marker_version, results
from fluency.core.run.measuring import MetricParts, check_requirements
from fluency.core.run.tables import MERGED, merge_tables, read_metric_columns

__all__ = ["ALL", "Latents", "MeasuredCheckpoint", "CheckpointObserver", "ReportWriter", "RunPlan", "plan", "run",
           "stored_layers"]


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
    groups: dict[str, dict[str, str]] | None = None  # --match-group: checkpoint label -> its subgroup
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
    models += [ModelRef(label, built=_built(name, label, resolved, metric_specs, stimuli, config, manager, console),
                        recipe=(name, dict(resolved[("architecture", name)]), config.seed))
               for name, label in zip(model_names, labels[len(paths):])]
    return RunPlan(config, stimuli, metric_specs, analysis_specs, resolved, models, duplicates,
                   resolve_device(config.device), raters=load_raters(config, stimuli),
                   covariates_requested=requested if adjusting else None, groups=_groups(config, stimuli, models))


def _groups(config: RunConfig, stimuli: Stimuli, models: list[ModelRef]) -> dict[str, dict[str, str]] | None:
    """--match-group: the subgroup of every checkpoint trained on one (checked: distinct groups, images in each)."""
    if not config.match_group:
        return None
    check_columns(stimuli.ratings, config.match_group)
    groups = {ref.label: g for ref in models if ref.path is not None
              and (g := checkpoint_group(ref.path)) is not None}
    if not groups:
        raise FluencyError(f"--match-group {','.join(config.match_group)}: none of the checkpoints was trained on a "
                           "subgroup (fluency train --by writes checkpoints.json beside them)")
    seen: dict[tuple[str, ...], str] = {}
    for label, group in groups.items():
        group_image_ids(stimuli.ratings, group, config.match_group, label)  # type: ignore[arg-type]
        values = tuple(group[c] for c in config.match_group)
        if values in seen:
            raise FluencyError(f"--match-group: checkpoints {seen[values]} and {label} were trained on the same "
                               f"subgroup {dict(zip(config.match_group, values))}; measure one of them")
        seen[values] = label
    return groups


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
    given = expand_checkpoints(config.checkpoints, config.checkpoints_from)
    paths, duplicates = unique_checkpoints(given or ([DEFAULT_CHECKPOINT] if default and not config.checkpoints_from
                                                     else []))
    for note in [*duplicates, *repeated]:
        console.print(f"[yellow]note:[/yellow] {escape(note['text'])}", highlight=False)
    if config.images is not None and default:
        console.print("[yellow]note:[/yellow] no --checkpoint: using the embedded default model, trained on "
                      "generated shapes at 64×64; train one on images like yours with `fluency train`, or "
                      "measure a pretrained network with --model (e.g. vgg16-imagenet).")
    loadable = []
    for path in paths:  # fields, architecture, option bounds, model size: before the run folder is touched
        try:
            check_checkpoint(path, manager)
            loadable.append(path)
        except FluencyError as exc:
            if config.fail_fast or len(paths) + len(model_names) == 1:
                raise
            console.print(f"[yellow]warning:[/yellow] {escape(str(exc))}; skipped (--fail-fast stops instead)",
                          highlight=False)
            duplicates.append({"path": str(path), "why": "unloadable", "text": str(exc)})
    if not loadable and not model_names:
        raise FluencyError("no checkpoint could be loaded: see the warnings above")
    return loadable, model_names, [*duplicates, *repeated]


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
    (the run is ``complete`` only once it is written). An ``out`` folder holding a run of the same stimuli,
    models, seed and store continues it: only the missing parts are computed. Returns a :class:`RunResult`.
    """
    if run_config is not None and settings:
        raise FluencyError(f"pass a RunConfig or settings, not both ({sorted(settings)})")
    config = run_config or RunConfig.create(**settings)
    started = time.perf_counter()
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True, quiet=not progress)
    with ExitStack() as units_executor:  # a local Dask cluster starts while the run is planned; closed after units
        executor = units_executor.enter_context(open_executor(executor_settings(config), console))
        return _planned(config, manager, console, observer, report, started, Executing(executor, units_executor))


@dataclass
class Executing:
    """The executor of a run's units, and how to shut it down once they are done."""

    executor: Executor
    stack: ExitStack


def _planned(config: RunConfig, manager: PluginManager, console: Console, observer: CheckpointObserver | None,
             report: ReportWriter | None, started: float, executing: Executing) -> RunResult:
    """Plan the run (every check before anything is written), then run it in its folder."""
    the_plan = plan(config, manager, console)
    figures = observer.start(the_plan.stimuli) if observer is not None else None  # its errors come before any work
    resuming = continues(config)
    if config.overwrite and config.out is not None and results(Path(config.out)):
        preflight(the_plan, manager)  # the previous run is removed only once this one is known to start
    with run_folder(config.out, config.overwrite, "fluency run", console, resume=resuming) as out_dir, \
            deterministic(config.deterministic):
        used = [("metric", n) for n in the_plan.metric_specs] + [("analysis", n) for n in the_plan.analysis_specs]
        record = RunRecord(out_dir, {
            "run_id": out_dir.name, "status": "running", "started": now(),
            "command": sys.argv if Path(sys.argv[0]).name == "fluency" else None, "cwd": str(Path.cwd()),
            "config": config.as_dict(),
            "inputs": {"stimuli": the_plan.stimuli.description, "duplicate_checkpoints": the_plan.duplicates},
            "metrics": list(the_plan.metric_specs), "analyses": list(the_plan.analysis_specs),
            "analysis_effects": effects_record(the_plan.analysis_specs),
            "options": {f"{k}.{n}": v for (k, n), v in the_plan.resolved.items()},
            "device": str(the_plan.device), "torch_settings": torch_settings(), "versions": versions(manager, used),
            "matching": the_plan.stimuli.report.as_dict() if the_plan.stimuli.report is not None else None,
            "unreadable_images": dict(the_plan.stimuli.unreadable), "warnings": [],
            **({"resumed": True} if resuming else {}),
            **({"figures": {**figures, "checkpoints": {}}} if figures is not None else {}),
        })
        record.write()
        try:
            return _run(the_plan, record, manager, console, observer, report, started, executing)
        except BaseException as exc:
            record.failed(exc, time.perf_counter() - started)
            raise


def continues(config: RunConfig) -> bool:
    """Whether ``config.out`` holds a run this one continues: a fluency run folder whose recorded config has the
    same stimuli, models, seed and store (other settings may differ: parts are keyed by them). A different run
    there is refused, naming the differences; ``--overwrite`` starts afresh instead."""
    if config.out is None or config.overwrite or not results(Path(config.out)):
        return False
    out = Path(config.out)
    if marker_version(out) is None or not (out / MANIFEST).exists():
        return False  # not a run of this fluency: run_folder says why it cannot be used
    recorded = read_manifest(out).get("config")
    if not isinstance(recorded, dict):
        return False
    differences = config.differences(recorded)
    if differences:
        raise FluencyError(f"--out {out} holds another run ({'; '.join(differences)}): choose another --out, or "
                           "pass --overwrite to replace it")
    return True


def _threads(config: RunConfig) -> int | None:
    """torch threads per unit: --threads; one with --deterministic or on a Dask worker; else torch's default."""
    if config.deterministic:
        return 1
    return config.threads if config.threads is not None else (None if config.executor == "local" else 1)


def executor_settings(config: RunConfig) -> ExecutorSettings:
    """The executor of a run's units, from its config (``slurm``: the config file's [slurm] table with
    ``--slurm KEY=VALUE`` over it)."""
    if config.slurm and config.executor != "slurm":
        raise FluencyError(f"--slurm is for --executor slurm (this run's executor is {config.executor})")
    slurm: dict[str, Any] = {}
    if config.executor == "slurm":
        slurm = slurm_options(read_config(config.config).get("slurm") if config.config else None, config.slurm)
    settings = ExecutorSettings(config.executor, config.workers, config.scheduler, _threads(config) or 1,
                                config.retries, slurm)
    settings.check()
    return settings


def _run(the_plan: RunPlan, record: RunRecord, manager: PluginManager, console: Console,
         observer: CheckpointObserver | None, report: ReportWriter | None, started: float,
         executing: Executing) -> RunResult:
    """The run proper: measure every checkpoint in units of work, gather their parts, analyse; each step recorded
    in ``record``."""
    config, stimuli, out_dir = the_plan.config, the_plan.stimuli, record.run_dir
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    outcome = _measure_units(the_plan, record, manager, console, executing)
    measured = outcome.measured
    late = late_failures(outcome)
    if late and config.strict:
        raise FluencyError(f"image {next(iter(late.values()))[0]} could not be read: {next(iter(late.values()))[1]}")
    unreadable = {**stimuli.unreadable, **{rel: why for rel, why in late.values()}}
    for rel, why in late.values():
        console.print(f"[yellow]warning:[/yellow] cannot read image {escape(rel)} ({escape(why)}); left out",
                      highlight=False)
    if late:
        record.set(unreadable_images=dict(unreadable))
        stimuli = _without(stimuli, {i: v[0] for i, v in late.items()})
    record.set(inputs={**record.data["inputs"], "checkpoints": [
        next(r.identity for r in outcome.results[label] if r.identity) for label in measured]})
    for label in measured:
        entry = store_record(outcome.results[label], label, out_dir, console)
        if entry is not None:
            record.entry("stores", label, entry)
    if observer is not None:
        _observe(the_plan, record, manager, observer, outcome, stimuli, console, list(late))
    for label in measured:
        found = warnings_of(outcome.results[label], label, out_dir / "figures" / f"recon-{label}.png")
        record.set(warnings=[*record.data.get("warnings", []), *found])
    parts = MetricParts(out_dir, out_dir.name, manager, the_plan.metric_specs, the_plan.resolved)
    files, columns = gather_parts(outcome, measured, parts, manager, out_dir)
    record.set(metric_parts=[parts.record(name) for name in the_plan.metric_specs], metric_columns=columns)
    rename = {label: matched_label(config.match_group) for label in the_plan.groups or {}}
    if rename:
        record.set(match_group={"columns": list(config.match_group), "label": matched_label(config.match_group),
                                "checkpoints": dict(the_plan.groups or {})})
    merge_tables(files, out_dir / MERGED, drop_ids=list(late), rename=rename)  # late failures: out of all
    if late and stimuli.report is not None:
        stimuli = replace(stimuli, report=_report_late(stimuli.report, {i: v[0] for i, v in late.items()},
                                                       unreadable))
        record.set(matching=stimuli.report.as_dict())
    metric_table = read_metric_columns(out_dir / MERGED)
    covariates = None if the_plan.covariates_requested is None else \
        Covariates.of(columns, the_plan.covariates_requested)
    if covariates is not None:
        record.set(covariates=covariates.record())
    t0 = time.perf_counter()
    outcome_a = analyse(metric_table, stimuli.ratings, stimuli.rating_column, the_plan.analysis_specs,
                        the_plan.resolved, out_dir, manager, config.by, config.min_group_size, console, covariates)
    if outcome_a.subgroups is not None:
        record.set(subgroups=outcome_a.subgroups)
    for name, seconds in outcome_a.timings.items():
        record.timing(name, seconds)
    record.timing("analyses", time.perf_counter() - t0)
    write_replicates(out_dir, outcome_a.results, record.data)  # models of one configuration, several seeds
    if the_plan.raters is not None:
        t0 = time.perf_counter()
        record.set(reliability=noise_ceiling(the_plan.raters, stimuli, config, out_dir))
        record.timing("reliability", time.perf_counter() - t0)
    if report is not None:
        _write_report(report, record, console)
    record.timing("total", time.perf_counter() - started)
    record.set(status="complete", finished=now(), outputs=outputs(out_dir))
    record.write()
    return RunResult(out_dir, None, outcome_a.results, record.data, stimuli.report, dict(unreadable))


def _measure_units(the_plan: RunPlan, record: RunRecord, manager: PluginManager, console: Console,
                   executing: Executing) -> Outcome:
    """Plan the units of work, run them on the executor, record what each did; stop when nothing was measured."""
    config, out_dir = the_plan.config, record.run_dir
    ids = stimulus_ids(the_plan.stimuli)
    groups = the_plan.groups or {}

    def ids_of(ref: ModelRef) -> list[str]:
        if ref.label not in groups:
            return ids
        return group_image_ids(the_plan.stimuli.ratings, groups[ref.label], config.match_group,  # type: ignore
                               ref.label)

    options = {name: dict(the_plan.resolved[("metric", name)]) for name in the_plan.metric_specs}
    waves = plan_units(the_plan.models, ids_of, the_plan.stimuli.make_source, config, out_dir.resolve(), options,
                       whole_set_metrics(the_plan.metric_specs), _threads(config))
    claim_units([u for wave in waves for u in wave])
    local, executor = config.executor == "local", executing.executor
    with executing.stack:
        record.set(executor={"kind": config.executor, "description": executor.description,
                             "threads": _threads(config), "retries": config.retries})
        if executor.dashboard:
            console.print(f"Dask dashboard: {executor.dashboard}", highlight=False)
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a task carries its stimuli's recipe (the embedded set: its 11 MB)
            warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
            outcome = execute(waves if local else [portable(w) for w in waves], executor, manager, console, local,
                              record.timing)
    record.timing("units", time.perf_counter() - t0)
    for label, seconds in seconds_per_label(outcome).items():
        record.timing(f"metrics[{label}]", seconds)
    tally = counts(outcome)
    record.set(units=unit_records(outcome), unit_counts=tally,
               failed_tasks=[{k: v for k, v in f.items() if k != "exception"} for f in outcome.failed])
    if tally["tasks"] > 1 or tally["reused"] or tally["from_store"]:
        console.print(f"[dim]units: {tally['tasks']} tasks: {tally['computed']} computed, {tally['from_store']} "
                      f"re-measured from their stores, {tally['reused']} reused, {tally['failed']} failed[/dim]",
                      highlight=False)
    raise_failure(outcome, config.fail_fast, console)
    return outcome


def stimulus_ids(stimuli: Stimuli) -> list[str]:
    """The ids of the stimuli in measuring order (listing a folder source decodes nothing)."""
    return list(stimuli.make_source(Preprocessing(None, 3)).ids)


def _observe(the_plan: RunPlan, record: RunRecord, manager: PluginManager, observer: CheckpointObserver,
             outcome: Outcome, stimuli: Stimuli, console: Console, late: list[str]) -> None:
    """Tell the observer about every measured checkpoint (its model loaded here, its latents from the units)."""
    out_dir = record.run_dir
    refs = {ref.label: ref for ref in the_plan.models}
    with progress_bar(console) as bars:
        for label in outcome.measured:
            t0 = time.perf_counter()
            task = bars.add_task(step("figures", label), total=1, status="drawing the figures")
            loaded = refs[label].load(manager)
            loaded.model.to(the_plan.device).eval()
            done = MeasuredCheckpoint(loaded, stimuli, latents(outcome.results[label], out_dir, late), out_dir,
                                      the_plan.device, the_plan.config.batch_size)
            figures = record.data["figures"]
            record.set(figures={**figures, "checkpoints": {**figures["checkpoints"], label: observer.measured(done)}})
            record.timing(f"figures[{label}]", time.perf_counter() - t0)
            bars.update(task, advance=1, status="")


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


def preflight(the_plan: RunPlan, manager: PluginManager) -> None:
    """Build every checkpoint's model and check the metrics' needs and layers against it, writing nothing: what
    ``--overwrite`` does before it removes a previous run, so that a typo (a layer name) keeps that run."""
    measuring = Measuring(the_plan.config, the_plan.metric_specs, the_plan.resolved, the_plan.device)
    for ref in the_plan.models:
        checked_model(ref.load(manager), measuring, manager)


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


