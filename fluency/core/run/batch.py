"""A run's units of work: planned per (checkpoint × shard), run on an executor with one progress display, and
gathered into the run's metric parts, stores, latents and warnings.

The units (:mod:`fluency.core.run.units`) run in any order and in any process; this module decides them,
hands them to the executor (:mod:`fluency.core.run.executors`), shows progress (tasks done of all, and per
checkpoint the images measured) and, once every unit of a checkpoint is done, puts its pieces together in
a fixed order (checkpoints as given, shards in order), so that the results do not depend on the executor or
on which units were reused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from fluency.core.atomic import claim
from fluency.core.errors import FluencyError, TaskFailure
from fluency.core.hashing import options_hash
from fluency.core.plugin.manager import PluginManager
from fluency.core.progress import progress_bar, step
from fluency.core.run.checks import merged_warnings
from fluency.core.run.forward import Latents
from fluency.core.run.measuring import MetricParts, column_clash
from fluency.core.run.store import MARKER, write_sharded_marker
from fluency.core.run.tables import merge_tables, part_name
from fluency.core.run.units import UNITS, Shard, Unit, UnitResult, run_unit, shards, whole_set


@dataclass
class Outcome:
    """What the units of a run gave: per checkpoint label its results (in unit order), and the failures."""

    results: dict[str, list[UnitResult]] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def measured(self) -> list[str]:
        """The checkpoints every unit of which succeeded, in the run's order."""
        bad = {f["label"] for f in self.failed}
        return [label for label in self.results if label not in bad]


def plan_units(models: Sequence[Any], ids_of: Callable[[Any], Sequence[str]], make_source: Any, config: Any,
               run_dir: Path, metric_options: Mapping[str, dict[str, Any]], whole_names: Sequence[str],
               threads: int | None) -> tuple[list[Unit], list[Unit]]:
    """The units of a run, in two waves: per checkpoint (``models``: ModelRefs) one unit per shard of the images
    ``ids_of(ref)``; then, for a checkpoint cut into several shards, one whole-set unit for the metrics named in
    ``whole_names`` (those run in the shard units otherwise)."""
    first: list[Unit] = []
    second: list[Unit] = []
    for ref in models:
        pieces = shards(list(ids_of(ref)), config.shard_size)
        sharded = len(pieces) > 1
        per_image = {n: o for n, o in metric_options.items() if not (sharded and n in whole_names)}
        common = dict(run_dir=run_dir, label=ref.label, model=ref, make_source=make_source, config=config,
                      sharded=sharded, threads=threads, force=config.force)
        first += [Unit(shard=piece, metrics=per_image, **common) for piece in pieces if per_image]
        whole = {n: o for n, o in metric_options.items() if sharded and n in whole_names}
        if whole:
            every = Shard(0, 1, tuple(i for piece in pieces for i in piece.ids))
            stores = tuple(piece.name for piece in pieces) if config.store else ()
            second.append(Unit(shard=every, metrics=whole, whole=True, shard_stores=stores, **common))
    return first, second


def whole_set_metrics(metric_specs: Mapping[str, Any]) -> list[str]:
    """The metrics that need the whole stimulus set (their class overrides ``finish()``)."""
    return [name for name, spec in metric_specs.items() if whole_set(spec.load())]


def claim_units(units: Sequence[Unit]) -> None:
    """Record in the run's ledger, before any worker writes, the folders the units own as a whole (workers in
    other processes write there without the ledger)."""
    for unit in units:
        claim(unit.folder, whole_folder=True)
        claim(unit.run_dir / "state" / unit.label, whole_folder=True)
        if unit.store_dir is not None:
            claim(unit.store_dir, whole_folder=True)


def execute(waves: Sequence[Sequence[Unit]], executor: Any, manager: PluginManager, console: Console,
            local: bool, record_timing: Callable[[str, float], None]) -> Outcome:
    """Run the waves of units one after the other on ``executor``, with one progress display: a ``tasks`` bar
    (done of all) and a ``metrics · LABEL`` bar per checkpoint (images measured). In-process (``local``) the
    units report every batch; elsewhere a bar moves when a unit ends."""
    outcome = Outcome()
    every = [u for wave in waves for u in wave]
    for unit in every:
        outcome.results.setdefault(unit.label, [])
    with progress_bar(console) as bars:
        overall = bars.add_task(step("tasks", f"{len(every)}"), total=len(every), status="") \
            if len(every) > 1 else None
        images = {label: sum(len(u.shard.ids) for u in every if u.label == label and not u.whole)
                  or sum(len(u.shard.ids) for u in every if u.label == label) for label in outcome.results}
        bar = {label: bars.add_task(step("metrics", label), total=images[label], status="")
               for label in outcome.results}
        for wave in waves:
            if not wave:
                continue
            fn = _local_fn(manager, bars, bar) if local else run_unit
            for index, result in executor.run(fn, list(wave), [u.key for u in wave]):
                unit = wave[index]
                done = _as_result(unit, result)
                outcome.results[unit.label].append(done)
                if done.error is not None:
                    outcome.failed.append({"label": unit.label, "unit": unit.name, "error": done.error,
                                           "detail": done.detail, "exception": done.exception})
                    if bar[unit.label] in bars.task_ids:  # its failure is reported in one line instead
                        bars.remove_task(bar[unit.label])
                record_timing(f"task[{unit.key}]", done.seconds)
                if not local and not unit.whole and bar[unit.label] in bars.task_ids:
                    bars.update(bar[unit.label], advance=len(unit.shard.ids))
                if overall is not None:
                    bars.update(overall, advance=1)
    return outcome


def _local_fn(manager: PluginManager, bars: Any, bar: Mapping[str, Any]) -> Callable[[Unit], UnitResult]:
    """The unit function in this process: the caller's plugin manager, progress per batch."""
    def fn(unit: Unit) -> UnitResult:
        shown = bar[unit.label] in bars.task_ids  # gone once another of the checkpoint's units failed

        def progress(n: int, status: str) -> None:
            if shown:
                bars.update(bar[unit.label], advance=0 if unit.whole else n, status=status)

        progress(0, "loading the model")
        if shown:
            bars.refresh()  # drawn now, not at the next tick: a small model may load before it
        return run_unit(unit, manager, progress)
    return fn


def _as_result(unit: Unit, result: Any) -> UnitResult:
    """The executor's answer as a UnitResult (a task that failed on every try becomes one with ``error``)."""
    if isinstance(result, UnitResult):
        return result
    error = getattr(result, "error", str(result))
    attempts = getattr(result, "attempts", 1)
    return UnitResult(unit.key, unit.label, unit.name, error=f"{unit.describe()}: {error} ({attempts} tries)")


def counts(outcome: Outcome) -> dict[str, int]:
    """How many units computed something, were reused whole, re-measured from their store, failed."""
    every = [r for results in outcome.results.values() for r in results]
    return {"tasks": len(every), "computed": sum(r.model_pass for r in every),
            "from_store": sum(bool(r.from_store) and not r.model_pass for r in every),
            "reused": sum(not r.model_pass and not r.from_store and r.error is None for r in every),
            "failed": sum(r.error is not None for r in every)}


def gather_parts(outcome: Outcome, labels: Sequence[str], metric_parts: MetricParts, manager: PluginManager,
                 run_dir: Path) -> tuple[list[Path], dict[str, dict[str, Any]]]:
    """One part per metric plugin under ``metrics/`` (as a run without units writes it): the units' parts of
    ``labels`` in order; and the metric columns ``{column: {"plugin", "higher_is_more_fluent"}}``."""
    files: list[Path] = []
    owners: dict[str, str] = {}
    for name in metric_parts.specs:
        sources = [run_dir / r.parts[name]["file"] for label in labels for r in _ordered(outcome.results[label])
                   if name in r.parts]
        for r in (r for label in labels for r in outcome.results[label] if name in r.parts):
            for column in r.parts[name]["columns"]:
                if owners.setdefault(column, name) != name:
                    raise column_clash(manager, column, owners[column], name)
        out = run_dir / part_name(name, options_hash(metric_parts.options[name]))
        claim(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        merge_tables(sources, out)
        files.append(out)
    columns = {c: {"plugin": p, "higher_is_more_fluent": metric_parts.specs[p].higher_is_more_fluent}
               for c, p in owners.items()}
    return files, columns


def _ordered(results: Sequence[UnitResult]) -> list[UnitResult]:
    """A checkpoint's unit results in shard order, the whole-set unit last."""
    return sorted(results, key=lambda r: (r.unit == "whole", r.unit))


def store_record(results: Sequence[UnitResult], label: str, run_dir: Path, console: Console) -> dict[str, Any] | None:
    """The manifest's description of a checkpoint's store (several shards: marked as one sharded store)."""
    pieces = [r for r in _ordered(results) if r.unit != "whole" and r.store is not None]
    if not pieces:
        return None
    folder = run_dir / "activations" / label
    first = dict(pieces[0].store)  # type: ignore[arg-type]
    notes = [n for r in pieces for n in (r.store or {}).get("notes", [])]
    widened = sorted({w for r in pieces for w in (r.store or {}).get("widened", [])})
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if len(pieces) > 1 or pieces[0].unit != "all":
        claim(folder / MARKER)
        write_sharded_marker(folder, [r.unit for r in pieces])
        first["shards"] = len(pieces)
    entry = {"path": str(folder.relative_to(run_dir)), "layers": first["layers"], "dtype": first["dtype"]}
    if "shards" in first:
        entry["shards"] = first["shards"]
    if widened:
        entry["widened"] = widened
    return entry


def latents(results: Sequence[UnitResult], run_dir: Path, drop: Sequence[str] = ()) -> Latents:
    """The latent means of a checkpoint, the shards' in order, without the images ``drop`` (those that failed to
    load for some checkpoint: left out of every one)."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    shape: tuple[int, ...] = ()
    for r in _ordered(results):
        if r.latents:
            with np.load(run_dir / r.latents, allow_pickle=False) as data:
                ids += [str(i) for i in data["ids"]]
                parts.append(np.asarray(data["mu"], np.float32))
                shape = tuple(int(s) for s in data["shape"])
    mu = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if drop and len(ids):
        keep = [i for i, image_id in enumerate(ids) if image_id not in set(drop)]
        ids, mu = [ids[i] for i in keep], mu[keep]
    return Latents(ids, mu, shape)


def warnings_of(results: Sequence[UnitResult], label: str, figure: Path | None) -> list[dict[str, str]]:
    """The checks' warnings of a checkpoint, from its shards' numbers pooled."""
    snapshots = [r.checks for r in _ordered(results) if r.checks]
    return merged_warnings(label, snapshots, figure)


def late_failures(outcome: Outcome) -> dict[str, list[str]]:
    """Images that passed the up-front check but failed to load in some unit: id -> [relative path, reason]."""
    return {i: v for results in outcome.results.values() for r in results for i, v in (r.late or {}).items()}


def unit_records(outcome: Outcome) -> list[dict[str, Any]]:
    """The manifest's line per unit: what it did and how long it took."""
    rows = []
    for results in outcome.results.values():
        for r in _ordered(results):
            what = "failed" if r.error else "computed" if r.model_pass else "from-store" if r.from_store else "reused"
            rows.append({"task": r.key, "images": r.images, "status": what, "computed": r.computed,
                         "from_store": r.from_store, "reused": r.reused, "seconds": r.seconds, "threads": r.threads,
                         **({"error": r.error} if r.error else {})})
    return rows


def units_folder(run_dir: Path) -> Path:
    return run_dir / UNITS


def portable(units: Sequence[Unit]) -> list[Unit]:
    """The units as sent to other processes: models by their recipe, not their loaded weights."""
    return [replace(u, model=u.model.portable()) for u in units]


def seconds_per_label(outcome: Outcome) -> dict[str, float]:
    return {label: sum(r.seconds for r in results) for label, results in outcome.results.items()}


def raise_failure(outcome: Outcome, fail_fast: bool, console: Console) -> None:
    """Stop the run when nothing was measured, or at the first failure with ``fail_fast`` (the original error when
    there is one); otherwise name each checkpoint left out."""
    if not outcome.failed:
        return
    if fail_fast or not outcome.measured:
        first = outcome.failed[0]
        exc = first.get("exception")
        if isinstance(exc, FluencyError) and len(outcome.failed) == 1:
            raise exc
        more = f" (and {len(outcome.failed) - 1} more failed task(s): see the manifest)" if len(outcome.failed) > 1 \
            else ""
        raise type(exc)(f"{first['error']}{more}") if isinstance(exc, FluencyError) else \
            TaskFailure(f"{first['error']}{more}")
    for failure in outcome.failed:
        console.print(f"[yellow]warning:[/yellow] {escape(failure['error'])}; checkpoint {escape(failure['label'])} "
                      "left out of the results (rerun the same command to try its tasks again)", highlight=False)
