"""``fluency measure``: activation metrics from completed activation stores, without the model or the images.

The store is the interchange: a run made last month, a store written on a GPU node, or activations
imported from another tool (``fluency store import``) are measured here, streamed in row groups, with
memory bounded by one batch of the layers read. Given a run folder, new metrics are *added* to it::

    RUN/metrics/<plugin>-<options hash>.parquet   a new part per new metric
    RUN/metrics.parquet                           the existing rows unchanged, the new rows appended
    RUN/manifest.json                             metrics, options, parts and a ``measured`` entry added
    RUN/analyses/                                 recomputed over the whole table (p_fdr stays run-wide)

A metric already in the run with the same options is skipped with a note; with other options it is
an error unless ``replace``. Model metrics (``needs="model"``) need the checkpoint and are refused;
image metrics (``needs="images"``) run only when ``images`` is given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape

from fluency.core.errors import FluencyError
from fluency.core.hashing import options_hash
from fluency.core.inputs.images import FolderSource, Preprocessing, iter_batches
from fluency.core.inputs.ratings import read_ratings
from fluency.core.inputs.stimuli import from_folder
from fluency.core.plugin.config import read_config, resolve_plugin_options
from fluency.core.plugin.manager import PluginManager, get_plugin_manager, read_registry
from fluency.core.plugin.metric import MetricBatch
from fluency.core.plugin.specs import MetricSpec
from fluency.core.progress import progress_bar
from fluency.core.run.analyse import analyse
from fluency.core.run.folder import (MANIFEST, RunResult, new_run_dir, now, outputs, read_manifest, versions,
                                     write_manifest)
from fluency.core.run.measuring import CheckpointMetrics, MetricParts
from fluency.core.run.store import MARKER, ActivationStore
from fluency.core.run.tables import MERGED, merge_tables, read_metric_table


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
    assert isinstance(found, FolderSource)
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
    task = bars.add_task(f"measure {escape('[' + label + ']')}", total=len(ids), status="")
    for batch in store.metric_batches(read, batch_size) if read else _id_batches(ids, batch_size, description):
        if pictures is not None:
            picture_ids, x = next(pictures)
            assert list(picture_ids) == list(batch.image_ids)
            batch = MetricBatch(batch.image_ids, x, batch.activations, description=description)
        metrics.compute(batch, label, parts, lambda name: bars.update(task, status=name))
        bars.update(task, advance=len(batch.image_ids), status="")
    metrics.finish(label, parts, out_dir / "state" / label)


def _id_batches(ids: Sequence[str], batch_size: int, description: Any) -> Any:
    for start in range(0, len(ids), batch_size):
        yield MetricBatch(list(ids[start:start + batch_size]), description=description)


def _ratings(target: Target, ratings: str | Path | None, id_column: str, rating_column: str | None,
             ids: set[str], console: Console) -> tuple[pd.DataFrame | None, str]:
    """The ratings to analyse: ``ratings`` (matched to the store's ids), else the run's own ``ratings.parquet``."""
    if ratings is None:
        if target.run_dir is None or not (target.run_dir / "ratings.parquet").exists():
            return None, rating_column or "rating"
        stimuli = ((target.manifest or {}).get("inputs") or {}).get("stimuli") or {}
        column = rating_column or stimuli.get("rating_column") or "rating"
        return pd.read_parquet(target.run_dir / "ratings.parquet"), column
    column = rating_column or "rating"
    table = read_ratings(ratings, id_column, column)
    table = table.rename(columns={id_column: "image_id"}) if id_column != "image_id" else table
    table["image_id"] = table["image_id"].astype(str)
    matched = table[table["image_id"].isin(ids) & table[column].notna()].reset_index(drop=True)
    if len(matched) < len(table) or len(matched) < len(ids):
        console.print(f"[yellow]note:[/yellow] {len(matched)} of {len(table)} rated ids are in the store "
                      f"({len(ids)} images); the others are left out of the analyses", highlight=False)
    if matched.empty:
        raise FluencyError(f"--ratings {ratings}: none of its ids ({id_column}) are image ids of the store")
    return matched, column


def measure(target: str | Path, metrics: Sequence[str], *, analyses: Sequence[str] | None = None,
            ratings: str | Path | None = None, id_column: str = "image_id", rating_column: str | None = None,
            images: str | Path | None = None, out: str | Path | None = None, options: Sequence[str] = (),
            config: str | Path | None = None, replace: bool = False, batch_size: int = 256, by: Sequence[str] = (),
            min_group_size: int = 10, progress: bool = True, manager: PluginManager | None = None,
            console: Console | None = None) -> RunResult:
    """Compute activation metrics from the store(s) at ``target`` (a store or a run folder), then analyses.

    A run folder is measured in place unless ``out`` names another folder; a bare store goes to ``out``
    (default a new folder under ``runs/``). Returns a :class:`RunResult` of the folder written.
    """
    started = time.perf_counter()
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True, quiet=not progress)
    found = open_target(target)
    specs = _split_specs(manager, metrics, images, console)
    in_place = found.run_dir is not None and (out is None or Path(out).resolve() == found.run_dir.resolve())
    existing = _existing_parts(found.manifest) if in_place else {}
    ids = {i for store in found.stores for i in store.image_ids}
    table, column = _ratings(found, ratings, id_column, rating_column, ids, console)
    names = analyses if analyses is not None else (found.manifest or {}).get("analyses") if in_place else None
    names = list(dict.fromkeys(read_registry()["run"]["default_analyses"] if names is None else names))
    analysis_specs = {name: manager.get("analysis", name) for name in (names if table is not None else [])}
    used = [("metric", n) for n in specs] + [("analysis", n) for n in analysis_specs]
    resolved = resolve_plugin_options(manager, used, options, read_config(config))
    new, dropped = _plan_parts(specs, resolved, existing, replace, console)
    out_dir = found.run_dir if in_place else Path(out) if out is not None else new_run_dir()
    assert out_dir is not None
    if not in_place and out_dir.exists() and any(out_dir.iterdir()):
        raise FluencyError(f"--out {out_dir}: the folder exists and is not empty; choose another")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = dict(found.manifest) if in_place and found.manifest else _new_manifest(out_dir, found, started)
    parts = MetricParts(out_dir, str(manifest.get("run_id", out_dir.name)), manager, new, resolved)
    timings: dict[str, float] = {}
    try:
        with progress_bar(console) as bars:
            for store in found.stores:
                t0 = time.perf_counter()
                _measure_store(store, CheckpointMetrics(manager, new, resolved), parts, out_dir, batch_size,
                               images, bars)
                timings[f"measure[{store.label}]"] = round(time.perf_counter() - t0, 3)
    except BaseException:
        parts.abort()
        raise
    parts.close()
    merged = out_dir / MERGED
    old = [merged] if in_place and merged.exists() else []
    dropped_columns = [c for name in dropped for c in existing[name]["columns"]]
    merge_tables(old + parts.files(), merged, replaced={merged: dropped_columns})
    for name in dropped:
        if existing[name].get("file"):
            (out_dir / existing[name]["file"]).unlink(missing_ok=True)
    metric_table = read_metric_table(merged)
    outcome = analyse(metric_table, table, column, analysis_specs, resolved, out_dir, manager, by, min_group_size,
                      console)
    manifest = _updated_manifest(manifest, parts, new, dropped, resolved, analysis_specs, outcome, manager, found,
                                 timings, started)
    if table is not None and not in_place:  # the ratings analysed, as a run records them
        manifest["inputs"] = {**manifest["inputs"], "stimuli": {"ratings": str(ratings or found.run_dir / "ratings.parquet"),
                                                                "id_column": id_column,
                                                                "rating_column": column}}
    write_manifest(out_dir, {**manifest, "outputs": outputs(out_dir)})
    return RunResult(out_dir, metric_table, outcome.results, read_manifest(out_dir))


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


def _new_manifest(out_dir: Path, found: Target, started: float) -> dict[str, Any]:
    return {"run_id": out_dir.name, "status": "running", "started": now(),
            "inputs": {"stores": [{"path": str(s.path.resolve()), "label": s.label, "layers": s.layers,
                                   "provenance": s.provenance, "model": s.description.as_dict()}
                                  for s in found.stores]},
            "metrics": [], "analyses": [], "options": {}, "metric_parts": [], "metric_columns": {}, "timings": {}}


def _updated_manifest(manifest: dict[str, Any], parts: MetricParts, new: dict[str, MetricSpec], dropped: list[str],
                      resolved: dict[tuple[str, str], dict[str, Any]], analysis_specs: dict[str, Any], outcome: Any,
                      manager: PluginManager, found: Target, timings: dict[str, float],
                      started: float) -> dict[str, Any]:
    """The manifest after measuring: a new dict (the one read from disk is not changed)."""
    written = [parts.record(name) for name in new if name in parts.writers]
    kept_parts = [p for p in manifest.get("metric_parts") or [] if p["plugin"] not in dropped]
    columns = {c: v for c, v in (manifest.get("metric_columns") or {}).items() if v.get("plugin") not in dropped}
    used = [("metric", n) for n in new] + [("analysis", n) for n in analysis_specs]
    old_versions = manifest.get("versions") or {}
    plugin_versions = {**(old_versions.get("plugins") or {}), **versions(manager, used)["plugins"]}
    entry = {"at": now(), "stores": [str(s.path) for s in found.stores], "metrics": list(new), "replaced": dropped,
             "timings": {**timings, "total": round(time.perf_counter() - started, 3)}}
    return {**manifest, "status": "complete", "finished": manifest.get("finished") or now(),
            "metrics": list(dict.fromkeys([*(manifest.get("metrics") or []), *new])),
            "analyses": list(analysis_specs),
            "options": {**(manifest.get("options") or {}),
                        **{f"{k}.{n}": v for (k, n), v in resolved.items() if n in new or k == "analysis"}},
            "metric_parts": kept_parts + written, "metric_columns": {**columns, **parts.metric_columns()},
            "versions": {**old_versions, "plugins": plugin_versions},
            **({"subgroups": outcome.subgroups} if outcome.subgroups is not None else {}),
            "timings": {**(manifest.get("timings") or {}), **outcome.timings},
            "measured": [*(manifest.get("measured") or []), entry]}
