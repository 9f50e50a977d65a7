"""``fluency measure``: activation metrics from completed activation stores, without the model or the images.

The store is the interchange: a run made last month, a store written on a GPU node, or activations
imported from another tool (``fluency store import``) are measured here, streamed in row groups, with
memory bounded by one batch of the layers read. Given a run folder, new metrics are *added* to it::

    RUN/metrics/<plugin>-<options hash>.parquet   a new part per new metric
    RUN/metrics.parquet                           the existing rows unchanged, the new rows appended
    RUN/manifest.json                             metrics, options, parts and a ``measured`` entry added
    RUN/analyses/                                 recomputed over the whole table (p_fdr stays run-wide)
    RUN/analyses-replicates.parquet               recomputed with them (replicate models; see run.replicates)

A metric already in the run with the same options is skipped with a note; with other options it is
an error unless ``replace``. Model metrics (``needs="model"``) need the checkpoint and are refused;
image metrics (``needs="images"``) run only when ``images`` is given.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape

from fluency.core.atomic import publish
from fluency.core.errors import FluencyError
from fluency.core.hashing import options_hash
from fluency.core.inputs.images import FolderSource, Preprocessing, iter_batches
from fluency.core.inputs.ratings import read_ratings
from fluency.core.inputs.stimuli import from_folder
from fluency.core.memory import HeapTrimmer
from fluency.core.plugin.config import read_config, resolve_plugin_options
from fluency.core.plugin.manager import PluginManager, get_plugin_manager
from fluency.core.plugin.metric import MetricBatch
from fluency.core.plugin.specs import MetricSpec
from fluency.core.progress import progress_bar, step
from fluency.core.run.analyse import analyse, default_analyses, effects_record
from fluency.core.run.covariates import COVARIATE_PLUGIN, Covariates, with_covariates
from fluency.core.run.folder import (MANIFEST, RunResult, new_run_dir, now, outputs, read_manifest, run_status,
                                     versions, write_manifest, writing)
from fluency.core.run.ledger import remove_if_unused, results
from fluency.core.run.lock import refuse_if_busy
from fluency.core.run.measuring import CheckpointMetrics, MetricParts, column_clash
from fluency.core.run.replicates import write_replicates
from fluency.core.run.store import MARKER, ActivationStore
from fluency.core.run.tables import MERGED, merge_tables, part_name, read_metric_columns


@dataclass(frozen=True)
class Target:
    """What is measured: the stores, and the run folder they belong to (None for a bare store)."""

    stores: list[ActivationStore]
    run_dir: Path | None
    manifest: dict[str, Any] | None


def open_target(path: str | Path) -> Target:
    """A run folder (every store under ``activations/``) or one store folder; incomplete stores are refused."""
    path = Path(path)
    if not path.is_dir():
        raise FluencyError(f"{path}: no such folder (give an activation store or a run folder)")
    if (path / MANIFEST).exists() and not (path / MARKER).exists():
        manifest = read_manifest(path)
        folders = sorted(p for p in (path / "activations").glob("*") if p.is_dir())
        if not folders:
            raise FluencyError(f"{path}: this run kept no activation store (it ran with --no-store, or only model "
                               "metrics): measure it again with `fluency run`")
        return Target([ActivationStore(p) for p in folders], path, manifest)
    return Target([ActivationStore(path)], None, None)


def _split_specs(manager: PluginManager, names: Sequence[str], images: str | Path | None,
                 console: Console) -> dict[str, MetricSpec]:
    """The metric specs to compute from a store; model metrics are an error, image metrics need ``images``."""
    specs: dict[str, MetricSpec] = {}
    for name in dict.fromkeys(names):
        spec = manager.get("metric", name)
        if spec.needs == "model":
            raise FluencyError(f"metric {name!r} needs the model and its checkpoint (needs='model'); a store holds "
                               f"activations only: use `fluency run --checkpoint CKPT --metric {name}`")
        if spec.needs == "images" and images is None:
            console.print(f"[yellow]note:[/yellow] {escape(name)} reads the images (needs='images'): pass --images "
                          "DIR to compute it; not measured", highlight=False)
            continue
        specs[name] = spec
    if not specs:
        raise FluencyError("nothing to measure: name at least one activation metric with --metric")
    return specs


def _existing_parts(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{plugin: {"options_hash", "options", "columns"}}`` of the metrics a run already holds (any version)."""
    if manifest is None:
        return {}
    columns: dict[str, list[str]] = {}
    for column, info in (manifest.get("metric_columns") or {}).items():
        columns.setdefault(str(info.get("plugin", column)), []).append(column)
    parts = {p["plugin"]: dict(p) for p in manifest.get("metric_parts") or []}
    for name in manifest.get("metrics") or []:  # version 1: no parts; the options are in the manifest
        if name not in parts:
            options = (manifest.get("options") or {}).get(f"metric.{name}", {})
            parts[name] = {"plugin": name, "options": options, "options_hash": options_hash(options), "file": None}
    for name, part in parts.items():
        part["columns"] = columns.get(name, [name])
    return parts


def _store_images(store: ActivationStore, images: str | Path, ids: Sequence[str]) -> FolderSource:
    """The images of ``ids`` from the folder ``images``, preprocessed as the store records."""
    pre = store.provenance.get("preprocessing") or {}
    shape = store.description.input_shape
    size = int(pre.get("size") or (shape[1] if len(shape) == 3 else 0))
    if not size:
        raise FluencyError(f"activation store {store.path} does not record the image size, so its images cannot "
                           "be prepared as the model saw them; measure image metrics with `fluency run`")
    channels = int(pre.get("channels") or (shape[0] if shape else 3))
    stimuli = from_folder(images, None, "image_id", "rating")
    found = stimuli.make_source(Preprocessing(size, channels, pre.get("resize") or "shorter-side+center-crop"))
    if not isinstance(found, FolderSource):
        raise FluencyError(f"--images {images}: not a folder of images")
    by_id = dict(zip(found.ids, found.paths))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise FluencyError(f"--images {images}: no image for {len(missing)} id(s) of the store, e.g. "
                           f"{', '.join(map(repr, missing[:5]))}")
    return FolderSource(found.root, {i: by_id[i] for i in ids}, found.preprocessing)


def _measure_store(store: ActivationStore, metrics: CheckpointMetrics, parts: MetricParts, out_dir: Path,
                   batch_size: int, images: str | Path | None, bars: Any) -> None:
    """Stream one store through the metrics (and the images, for image metrics)."""
    description, label = store.description, store.label
    read = metrics.layers(description)
    missing = [layer for layer in read if layer not in store.layers]
    if missing:
        raise FluencyError(f"activation store {store.path} has no layer(s) {missing} (it holds {store.layers}); "
                           "choose stored layers with -o METRIC.layers=[...], or run again with --store-layers")
    needs_images = any(spec.needs == "images" for spec in metrics.specs.values())
    ids = store.image_ids
    source = _store_images(store, images, ids) if needs_images and images is not None else None
    pictures = iter_batches(source, batch_size) if source is not None else None
    task = bars.add_task(step("measure", label), total=len(ids), status="")
    trimmer = HeapTrimmer()  # as in a forward pass: batch-sized arrays fragment glibc's heap (core/memory.py)
    for batch in store.metric_batches(read, batch_size) if read else _id_batches(ids, batch_size, description):
        if pictures is not None:
            picture_ids, x = next(pictures)
            if list(picture_ids) != list(batch.image_ids):
                raise FluencyError(f"--images {images}: the images and the store's rows went out of step at "
                                   f"{batch.image_ids[0]!r} (an unreadable image?)")
            batch = MetricBatch(batch.image_ids, x, batch.activations, description=description)
        metrics.compute(batch, label, parts, lambda name: bars.update(task, status=name))
        bars.update(task, advance=len(batch.image_ids), status="")
        trimmer.tick()
    metrics.finish(label, parts, out_dir / "state" / label)


def _id_batches(ids: Sequence[str], batch_size: int, description: Any) -> Any:
    for start in range(0, len(ids), batch_size):
        yield MetricBatch(list(ids[start:start + batch_size]), description=description)


def _ratings(target: Target, in_place: bool, ratings: str | Path | None, id_column: str,
             rating_column: str | None, ids: set[str], console: Console) -> tuple[pd.DataFrame | None, str]:
    """The ratings to analyse: ``ratings`` (matched to the store's ids), else the run's own ``ratings.parquet``."""
    stimuli = ((target.manifest or {}).get("inputs") or {}).get("stimuli") or {}
    if ratings is None:
        if target.run_dir is None or not (target.run_dir / "ratings.parquet").exists():
            return None, rating_column or "rating"
        return pd.read_parquet(target.run_dir / "ratings.parquet"), rating_column or stimuli.get("rating_column") \
            or "rating"
    if in_place:
        raise FluencyError(f"--ratings {ratings}: a run folder keeps the ratings it was analysed with; to analyse "
                           "other ratings, measure into another folder with --out")
    column = rating_column or "rating"
    table = read_ratings(ratings, id_column, column)
    table["image_id"] = table["image_id"].astype(str)
    matched = table[table["image_id"].isin(ids) & table[column].notna()].reset_index(drop=True)
    if matched.empty:
        raise FluencyError(f"--ratings {ratings}: none of its ids ({id_column}) are image ids of the store")
    if len(matched) < len(table) or len(matched) < len(ids):
        console.print(f"[yellow]note:[/yellow] {len(matched)} images have a rating and activations; "
                      f"{len(table) - len(matched)} rated ids are not in the store and {len(ids) - len(matched)} "
                      "stored images have no rating: both are left out of the analyses", highlight=False)
    return matched, column


@dataclass(frozen=True)
class MeasurePlan:
    """A validated measure: where it writes, what it computes, replaces and analyses."""

    target: Target
    out_dir: Path
    in_place: bool
    new: dict[str, MetricSpec]
    dropped: list[str]
    existing: dict[str, dict[str, Any]]
    resolved: dict[tuple[str, str], dict[str, Any]]
    ratings: pd.DataFrame | None
    ratings_source: str | None
    rating_column: str
    analysis_specs: dict[str, Any]
    by: tuple[str, ...]
    min_group_size: int
    #: None: no covariates; else whether the user asked for them as a metric too
    covariates_requested: bool | None = None


def _run_settings(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The analysis settings a run used (its config, or for version 1 its subgroups block)."""
    manifest = manifest or {}
    config = manifest.get("config") or {}
    groups = manifest.get("subgroups") or {}
    return {"by": tuple(config.get("by") or groups.get("by") or ()),
            "min_group_size": int(config.get("min_group_size") or groups.get("min_group_size") or 10),
            "options": {key.split(".", 1)[1]: value for key, value in (manifest.get("options") or {}).items()
                        if key.startswith("analysis.")}}


def plan_measure(target: str | Path, metrics: Sequence[str], *, analyses: Sequence[str] | None,
                 ratings: str | Path | None, id_column: str, rating_column: str | None, images: str | Path | None,
                 out: str | Path | None, options: Sequence[str], config: str | Path | None, replace: bool,
                 by: Sequence[str] | None, min_group_size: int | None, manager: PluginManager,
                 console: Console, covariates: bool = True) -> MeasurePlan:
    """Check everything before any work: target, metrics, out folder, ratings, analyses, options."""
    found = open_target(target)
    in_place = found.run_dir is not None and (out is None or Path(out).resolve() == found.run_dir.resolve())
    requested, raw_why = _covariates_plan(found.manifest if in_place else None, metrics, images, covariates)
    metrics = with_covariates(metrics, requested is not None and images is not None)[0]
    specs = _split_specs(manager, metrics, images, console)
    if in_place and found.run_dir is not None:
        refuse_if_busy(found.run_dir)
        status, note = run_status(found.run_dir, found.manifest or {"status": "complete"})
        if status != "complete":
            raise FluencyError(f"{found.run_dir}: this run did not complete (status {status}"
                               f"{': ' + note if note else ''}); measure its stores into another folder with --out, "
                               "or run it again")
    out_dir = found.run_dir if in_place and found.run_dir is not None else Path(out) if out is not None \
        else new_run_dir()
    if not in_place and out_dir.exists() and (not out_dir.is_dir() or results(out_dir)):
        raise FluencyError(f"--out {out_dir}: exists and is not an empty folder; choose another")
    ids = {i for store in found.stores for i in store.image_ids}
    table, column = _ratings(found, in_place, ratings, id_column, rating_column, ids, console)
    settings = _run_settings(found.manifest) if in_place else {"by": (), "min_group_size": 10, "options": {}}
    names = analyses if analyses is not None else (found.manifest or {}).get("analyses") if in_place else None
    if table is None and analyses:
        raise FluencyError("--analysis needs ratings: pass --ratings TABLE (matched to the store's image ids)")
    if table is not None and raw_why:
        console.print(f"[yellow]note:[/yellow] {escape(raw_why)}", highlight=False)
    names = list(dict.fromkeys(default_analyses(len(found.stores)) if names is None else names))
    analysis_specs = {name: manager.get("analysis", name) for name in (names if table is not None else [])}
    used = [("metric", n) for n in specs] + [("analysis", n) for n in analysis_specs]
    earlier = {"analysis": {n: o for n, o in settings["options"].items() if n in analysis_specs}}
    resolved = resolve_plugin_options(manager, used, options, {**earlier, **read_config(config)})
    groups = tuple(by) if by is not None else settings["by"]
    if groups and table is not None:
        missing = [c for c in groups if c not in table.columns]
        if missing:
            raise FluencyError(f"--by {','.join(groups)}: no column(s) {missing} in the ratings table "
                               f"(columns: {list(table.columns)})")
    existing = _existing_parts(found.manifest) if in_place else {}
    new, dropped = _plan_parts(specs, resolved, existing, replace, console)
    source = str(Path(ratings).resolve()) if ratings is not None else \
        str(found.run_dir / "ratings.parquet") if table is not None and found.run_dir is not None else None
    return MeasurePlan(found, out_dir, in_place, new, dropped, existing, resolved, table, source, column,
                       analysis_specs,
                       groups, settings["min_group_size"] if min_group_size is None else min_group_size, requested)


def _covariates_plan(manifest: dict[str, Any] | None, metrics: Sequence[str], images: str | Path | None,
                     on: bool) -> tuple[bool | None, str]:
    """(whether the covariates were asked for as metrics, None: the analyses run without covariates; why not).

    They come from the run's own ``image-stats`` part (``manifest``: the run measured in place), else from the
    images (``images``: ``image-stats`` is computed); without either the relations are raw.
    """
    if not on:
        return None, ""
    asked = COVARIATE_PLUGIN in metrics
    columns = (manifest or {}).get("metric_columns") or {}
    if any(info.get("plugin") == COVARIATE_PLUGIN for info in columns.values()):
        return bool(((manifest or {}).get("covariates") or {}).get("requested", True)) or asked, ""
    if images is not None:
        return asked, ""
    return None, (f"relations are raw, not controlled for low-level image statistics: a store keeps activations, "
                  f"not images, and this run has no {COVARIATE_PLUGIN} part; pass --images DIR to compute them "
                  "(--no-covariates silences this note)")


def measure(target: str | Path, metrics: Sequence[str], *, analyses: Sequence[str] | None = None,
            ratings: str | Path | None = None, id_column: str = "image_id", rating_column: str | None = None,
            images: str | Path | None = None, out: str | Path | None = None, options: Sequence[str] = (),
            config: str | Path | None = None, replace: bool = False, batch_size: int = 256,
            by: Sequence[str] | None = None, min_group_size: int | None = None, progress: bool = True,
            manager: PluginManager | None = None, console: Console | None = None, covariates: bool = True
            ) -> RunResult:
    """Compute activation metrics from the store(s) at ``target`` (a store or a run folder), then analyses.

    A run folder is measured in place unless ``out`` names another folder (its ratings, subgroups and
    analysis options are kept); a bare store goes to ``out`` (default a new folder under ``runs/``). The
    run folder changes only when everything has succeeded: the merged table and the manifest are replaced
    last, and on failure the parts this call wrote are removed. Returns a :class:`RunResult`.
    """
    started = time.perf_counter()
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True, quiet=not progress)
    plan = plan_measure(target, metrics, analyses=analyses, ratings=ratings, id_column=id_column,
                        rating_column=rating_column, images=images, out=out, options=options, config=config,
                        replace=replace, by=by, min_group_size=min_group_size, manager=manager, console=console,
                        covariates=covariates)
    created = not plan.out_dir.exists()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with writing(plan.out_dir, "fluency measure", console, new=not plan.in_place):
            return _measure(plan, manager, batch_size, images, console, started)
    except BaseException:
        if created:
            remove_if_unused(plan.out_dir)
        raise


def _measure(plan: MeasurePlan, manager: PluginManager, batch_size: int, images: str | Path | None,
             console: Console, started: float) -> RunResult:
    """Measure, merge, analyse; the run folder changes only when all of it succeeded."""
    manifest = dict(plan.target.manifest) if plan.in_place and plan.target.manifest else \
        _new_manifest(plan.out_dir, plan.target)
    parts = MetricParts(plan.out_dir, str(manifest.get("run_id", plan.out_dir.name)), manager, plan.new,
                        plan.resolved)
    staged = plan.out_dir / (MERGED + ".new")
    try:
        timings = _measure_stores(plan, parts, manager, batch_size, images, console)
        for column, plugin in parts.columns.items():
            owner = ((manifest.get("metric_columns") or {}).get(column) or {}).get("plugin", plugin)
            if plan.in_place and owner != plugin and owner not in plan.dropped:
                raise column_clash(manager, column, owner, plugin)
        old = [plan.out_dir / MERGED] if plan.in_place and (plan.out_dir / MERGED).exists() else []
        dropped_columns = [c for name in plan.dropped for c in plan.existing[name]["columns"]]
        merge_tables(old + parts.files(), staged, replaced={p: dropped_columns for p in old})
        metric_table = read_metric_columns(staged)
        covariates = None if plan.covariates_requested is None else Covariates.of(
            {**(manifest.get("metric_columns") or {}), **parts.metric_columns()}, plan.covariates_requested)
        outcome = analyse(metric_table, plan.ratings, plan.rating_column, plan.analysis_specs, plan.resolved,
                          plan.out_dir, manager, plan.by, plan.min_group_size, console, covariates)
    except BaseException:
        parts.abort()
        _remove_own(parts, staged)
        raise
    publish(staged, plan.out_dir / MERGED)
    _remove_replaced(plan)
    manifest = _updated_manifest(manifest, plan, parts, outcome, manager, timings, started)
    if plan.ratings is not None:  # the covariates the analyses were controlled for, as they ran now
        manifest = {k: v for k, v in manifest.items() if k != "covariates"}
        manifest.update({"covariates": covariates.record()} if covariates is not None else {})
        write_replicates(plan.out_dir, outcome.results, manifest)  # their aggregate over replicate models
    write_manifest(plan.out_dir, {**manifest, "outputs": outputs(plan.out_dir)})
    return RunResult(plan.out_dir, None, outcome.results, read_manifest(plan.out_dir))


def _measure_stores(plan: MeasurePlan, parts: MetricParts, manager: PluginManager, batch_size: int,
                    images: str | Path | None, console: Console) -> dict[str, float]:
    """Every store through fresh metric instances; seconds per store."""
    timings: dict[str, float] = {}
    with progress_bar(console) as bars:
        for store in plan.target.stores:
            t0 = time.perf_counter()
            _measure_store(store, CheckpointMetrics(manager, plan.new, plan.resolved), parts, plan.out_dir,
                           batch_size, images, bars)
            timings[f"measure[{store.label}]"] = round(time.perf_counter() - t0, 3)
    parts.close()
    return timings


def _remove_own(parts: MetricParts, staged: Path) -> None:
    """After a failure: remove the parts this call wrote and the staged table."""
    for writer in parts.writers.values():
        for path in (writer.path, writer.partial):
            path.unlink(missing_ok=True)
    staged.unlink(missing_ok=True)


def _remove_replaced(plan: MeasurePlan) -> None:
    """Delete the parts of replaced metrics and the tables of analyses no longer run: files fluency wrote,
    found by the names it gives them (never by a path read from the manifest)."""
    for name in plan.dropped:
        old = plan.existing[name]
        if old.get("file"):
            (plan.out_dir / part_name(name, str(old["options_hash"]))).unlink(missing_ok=True)
    if plan.in_place and plan.ratings is not None:
        for name in (plan.target.manifest or {}).get("analyses") or []:
            if name not in plan.analysis_specs and re.fullmatch(r"[a-z][a-z0-9_-]*", str(name)):
                (plan.out_dir / "analyses" / f"{name}.parquet").unlink(missing_ok=True)


def _plan_parts(specs: dict[str, MetricSpec], resolved: dict[tuple[str, str], dict[str, Any]],
                existing: dict[str, dict[str, Any]], replace: bool,
                console: Console) -> tuple[dict[str, MetricSpec], list[str]]:
    """The metrics to compute, and those whose earlier rows they replace; same options: skipped with a note."""
    new: dict[str, MetricSpec] = {}
    dropped: list[str] = []
    for name, spec in specs.items():
        before = existing.get(name)
        if before is not None and before["options_hash"] == options_hash(resolved[("metric", name)]):
            console.print(f"[yellow]note:[/yellow] {escape(name)} is already in this run with the same options; "
                          "not measured again", highlight=False)
            continue
        if before is not None and not replace:
            raise FluencyError(f"metric {name!r} is already in this run with other options {before['options']}; "
                               "pass --replace to replace its rows, or measure into another folder with --out")
        if before is not None:
            dropped.append(name)
        new[name] = spec
    if not new:
        console.print("[yellow]note:[/yellow] every metric is already measured; analyses and report are rebuilt",
                      highlight=False)
    return new, dropped


def _new_manifest(out_dir: Path, found: Target) -> dict[str, Any]:
    return {"run_id": out_dir.name, "status": "running", "started": now(),
            "inputs": {"stores": [{"path": str(s.path.resolve()), "label": s.label, "layers": s.layers,
                                   "provenance": s.provenance, "model": s.description.as_dict()}
                                  for s in found.stores]},
            "metrics": [], "analyses": [], "options": {}, "metric_parts": [], "metric_columns": {}, "timings": {}}


def _updated_manifest(manifest: dict[str, Any], plan: MeasurePlan, parts: MetricParts, outcome: Any,
                      manager: PluginManager, timings: dict[str, float], started: float) -> dict[str, Any]:
    """The manifest after measuring: a new dict (the one read from disk is not changed)."""
    new, dropped = plan.new, plan.dropped
    written = [parts.record(name) for name in new if name in parts.writers]
    kept_parts = [p for p in manifest.get("metric_parts") or [] if p["plugin"] not in dropped]
    columns = {c: v for c, v in (manifest.get("metric_columns") or {}).items() if v.get("plugin") not in dropped}
    used = [("metric", n) for n in new] + [("analysis", n) for n in plan.analysis_specs]
    old_versions = manifest.get("versions") or {}
    plugin_versions = {**(old_versions.get("plugins") or {}), **versions(manager, used)["plugins"]}
    entry = {"at": now(), "stores": [str(s.path.resolve()) for s in plan.target.stores], "metrics": list(new),
             "replaced": dropped, "timings": {**timings, "total": round(time.perf_counter() - started, 3)}}
    inputs = manifest.get("inputs") or {}
    if plan.ratings is not None and not plan.in_place:  # the ratings analysed, as a run records them
        inputs = {**inputs, "stimuli": {"ratings": plan.ratings_source, "rating_column": plan.rating_column}}
    if plan.ratings is not None and outcome.subgroups is None:  # re-analysed without subgroups
        manifest = {k: v for k, v in manifest.items() if k != "subgroups"}
    return {**manifest, "status": "complete", "finished": manifest.get("finished") or now(), "inputs": inputs,
            "metrics": list(dict.fromkeys([*(manifest.get("metrics") or []), *new])),
            "analyses": list(plan.analysis_specs) if plan.ratings is not None else manifest.get("analyses", []),
            "analysis_effects": (effects_record(plan.analysis_specs) if plan.ratings is not None
                                 else manifest.get("analysis_effects", {})),
            "options": {**(manifest.get("options") or {}),
                        **{f"{k}.{n}": v for (k, n), v in plan.resolved.items() if n in new or k == "analysis"}},
            "metric_parts": kept_parts + written, "metric_columns": {**columns, **parts.metric_columns()},
            "versions": {**old_versions, "plugins": plugin_versions},
            **({"subgroups": outcome.subgroups} if outcome.subgroups is not None else {}),
            "timings": {**(manifest.get("timings") or {}), **outcome.timings},
            "measured": [*(manifest.get("measured") or []), entry]}
