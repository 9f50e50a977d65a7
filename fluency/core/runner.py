"""``fluency run``: checkpoints × stimuli → activation store → metric table → analyses.

The same function serves the CLI and notebooks::

    import fluency
    result = fluency.run(metrics=["gini", "sam"])          # embedded default
    result = fluency.run(images="faces/", ratings="ratings.csv", rating_column="attractiveness",
                         metrics=["gini", "lepsilon"], options=["lepsilon.epsilon=0.1"])
    result.metrics            # long table: image_id, checkpoint, metric, layer, value
    result.analyses["pearson"]
    result.strongest(10)      # the strongest relations, FDR-corrected
    result.path               # the run folder

Everything a run writes goes into one folder: ``activations/<checkpoint>/`` (the
Parquet activation store), ``metrics.parquet``, ``analyses/<name>.parquet``,
``ratings.parquet`` (the ratings the analyses used) and ``manifest.json`` (inputs,
options, versions, timings, the id-matching report and the run's status).
"""

from __future__ import annotations

import platform
import secrets
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.markup import escape

from fluency import __version__
from fluency.core.analysis import AnalysisData
from fluency.core.atomic import atomic_path, atomic_write_json
from fluency.core.capture import capture_activations
from fluency.core.checkpoint import DEFAULT_CHECKPOINT, LoadedCheckpoint, file_sha256, load_checkpoint
from fluency.core.config import read_config, resolve_plugin_options
from fluency.core.devices import resolve_device
from fluency.core.errors import FluencyError, InputError
from fluency.core.images import FolderSource, ImageSource, Preprocessing, iter_batches
from fluency.core.losses import loss_from_config
from fluency.core.metric import FluencyMetric, MetricBatch, units_as_rows
from fluency.core.plugins import PluginManager, get_plugin_manager, read_registry
from fluency.core.progress import progress_bar
from fluency.core.ratings import MatchReport
from fluency.core.run_figures import Latents, interpolation_pairs, write_checkpoint_figures
from fluency.core.stats import fdr_bh
from fluency.core.stimuli import Stimuli, embedded, from_folder
from fluency.core.store import ActivationStoreWriter, MetricTableWriter, read_metric_table


@dataclass
class RunResult:
    """What a run produced: its folder, the metric table and one table per analysis."""

    path: Path
    metrics: pd.DataFrame
    analyses: dict[str, pd.DataFrame] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    report: MatchReport | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # image path (relative) -> why it was skipped

    def strongest(self, top: int | None = 10) -> pd.DataFrame:
        """Analysis rows, strongest first (smallest FDR-corrected p, then largest |estimate|).

        With ``top``, the ``top`` strongest rows plus the strongest row of every metric not among them,
        so that no metric disappears from the summary.
        """
        if not self.analyses:
            return pd.DataFrame()
        table = pd.concat(self.analyses.values(), ignore_index=True)
        table = table.assign(_abs=table["estimate"].abs()).sort_values(["p_fdr", "_abs"], ascending=[True, False],
                                                                       na_position="last")
        table = table.drop(columns="_abs").reset_index(drop=True)
        if top is None:
            return table
        keep = set(table.index[:top]) | set(table.drop_duplicates("metric").index)
        return table.loc[sorted(keep)].reset_index(drop=True)


def _new_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{secrets.token_hex(3)}"


def _prepare_out(out: str | Path | None, overwrite: bool) -> Path:
    path = Path(out) if out is not None else _new_run_dir()
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FluencyError(f"--out {path}: the folder exists and is not empty; choose another or pass --overwrite")
        if not (path / "manifest.json").exists():
            raise FluencyError(f"--out {path}: refusing to overwrite a folder that is not a fluency run")
        import shutil

        for name in ("activations", "analyses", "state", "figures", "latents"):  # no stale table may survive
            shutil.rmtree(path / name, ignore_errors=True)
        for name in ("metrics.parquet", "metrics.parquet.partial", "ratings.parquet", "report.html"):
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _labels(paths: Sequence[Path]) -> list[str]:
    labels: list[str] = []
    for path in paths:
        label = "default" if path == DEFAULT_CHECKPOINT else path.stem
        if path.stem == "final" and path != DEFAULT_CHECKPOINT:
            label = path.resolve().parent.name or label  # '../final.pt' is named by its folder, not '..'
        base, k = label, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def _unique_checkpoints(paths: Sequence[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """``paths`` without repeats, and one note per path left out (``path``, ``same_as``, ``why``, ``text``).

    A path is left out when it names the same file as an earlier one (``why``: ``"same
    path"`` once resolved, or ``"same file"``, e.g. a hard link) or a file with the same
    bytes (``"same content"``; sha256, computed only for files of equal size). Missing
    files are kept, for the loader to report.
    """
    kept: list[Path] = []
    notes: list[dict[str, str]] = []
    by_inode: dict[tuple[int, int], Path] = {}
    by_size: dict[int, list[Path]] = {}
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = file_sha256(path)
        return digests[path]

    for path in paths:
        try:
            st = path.stat()
        except OSError:
            kept.append(path)
            continue
        first = by_inode.get((st.st_dev, st.st_ino))
        if first is not None:
            same_path = first.resolve() == path.resolve()
            text = (f"--checkpoint {path} is given more than once" if str(path) == str(first) else
                    f"--checkpoint {path} is {'the same path' if same_path else 'the same file'} as {first}")
            notes.append({"path": str(path), "same_as": str(first), "why": "same path" if same_path else "same file",
                          "text": f"{text}: measured once"})
            continue
        twin = next((k for k in by_size.get(st.st_size, []) if digest(k) == digest(path)), None)
        if twin is not None:
            notes.append({"path": str(path), "same_as": str(twin), "why": "same content", "sha256": digest(path),
                          "text": f"--checkpoint {path} has the same content as {twin} (sha256 "
                                  f"{digest(path)[:12]}…): measured once, as {twin}"})
            continue
        by_inode[(st.st_dev, st.st_ino)] = path
        by_size.setdefault(st.st_size, []).append(path)
        kept.append(path)
    return kept, notes


def _drop_images(path: Path, image_ids: Sequence[str]) -> None:
    """Rewrite the metric table at ``path`` without the rows of ``image_ids``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = pq.read_table(path)
    data = data.filter(pc.invert(pc.is_in(data["image_id"], value_set=pa.array(list(image_ids), pa.string()))))
    with atomic_path(path) as tmp:
        pq.write_table(data, tmp)


def _check_finite(acts: dict[str, torch.Tensor], ids: Sequence[str], label: str) -> None:
    for layer, tensor in acts.items():
        finite = torch.isfinite(units_as_rows(tensor)).all(dim=1)
        if not bool(finite.all()):
            bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
            raise FluencyError(f"checkpoint {label}: NaN/Inf activations in layer {layer!r} for images {bad[:10]}"
                               f"{' and more' if len(bad) > 10 else ''}")


def run(
    metrics: Sequence[str],
    images: str | Path | None = None,
    ratings: str | Path | None = None,
    id_column: str = "image_id",
    rating_column: str = "rating",
    checkpoints: Sequence[str | Path] = (),
    analyses: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    seed: int = 0,
    options: Sequence[str] = (),
    config: str | Path | None = None,
    store: bool = True,
    store_dtype: str = "float16",
    strict: bool = False,
    overwrite: bool = False,
    by: Sequence[str] = (),
    min_group_size: int = 10,
    interpolate: Sequence[str | tuple[str, str]] = (),
    figures: bool = True,
    progress: bool = True,
    manager: PluginManager | None = None,
    console: Console | None = None,
) -> RunResult:
    """Compute ``metrics`` for every image and checkpoint, then run ``analyses`` against the ratings.

    With neither ``images`` nor ``checkpoints`` it uses the embedded default. ``options``
    are ``[KIND.]PLUGIN.KEY=VALUE`` strings as for ``-o``. With ``figures`` (default) each checkpoint also
    gets ``latents/`` and its model figures (:mod:`fluency.core.run_figures`), with latent interpolations
    between the ``interpolate`` pairs (``"ID_A,ID_B"``). Returns a :class:`RunResult`.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True, quiet=not progress)
    metric_names = list(dict.fromkeys(metrics))
    if not metric_names:
        raise FluencyError(f"name at least one --metric (available: {', '.join(manager.names('metric'))})")
    metric_specs = {name: manager.get("metric", name) for name in metric_names}

    if images is None and ratings is not None:
        raise FluencyError("--ratings needs --images (the folder of the rated images)")
    stimuli: Stimuli = embedded() if images is None else from_folder(images, ratings, id_column, rating_column, strict)
    if stimuli.ratings is None and analyses:
        raise FluencyError("--analysis needs ratings: pass --ratings TABLE (and --rating-column)")
    analysis_names = list(dict.fromkeys(read_registry()["run"]["default_analyses"] if analyses is None else analyses))
    if stimuli.ratings is None:
        analysis_names = []
    analysis_specs = {name: manager.get("analysis", name) for name in analysis_names}
    used = [("metric", n) for n in metric_names] + [("analysis", n) for n in analysis_names]
    resolved = resolve_plugin_options(manager, used, options, read_config(config))
    if layers:  # --layers: the layers of every metric that has a `layers` option and was given none
        for name, spec in metric_specs.items():
            if "layers" in spec.options and not resolved[("metric", name)].get("layers"):
                resolved[("metric", name)]["layers"] = list(layers)

    ckpt_paths, duplicates = _unique_checkpoints([Path(c) for c in checkpoints] or [DEFAULT_CHECKPOINT])
    for note in duplicates:
        console.print(f"[yellow]note:[/yellow] {escape(note['text'])}", highlight=False)
    if images is not None and not checkpoints:
        console.print("[yellow]note:[/yellow] no --checkpoint: using the embedded default model, trained on "
                      "generated shapes at 64×64; train one on images like yours with `fluency train`.")
    if not DEFAULT_CHECKPOINT.exists() and not checkpoints:
        raise FluencyError(f"the embedded default checkpoint {DEFAULT_CHECKPOINT} is missing; reinstall fluency "
                           "or pass --checkpoint")
    pairs = interpolation_pairs(interpolate, stimuli) if figures else []  # unknown ids fail before any work
    dev = resolve_device(device)
    unreadable = dict(stimuli.unreadable)  # relative path -> reason; grows if a file fails while measuring
    late: dict[str, str] = {}  # image id -> relative path, for files that failed while measuring

    def skip_image(source: ImageSource, index: int, exc: InputError) -> None:
        """A file that passed the up-front check but failed to load: leave it out (``strict``: stop)."""
        if strict:
            raise exc
        cause = exc.__cause__
        image_id = source.ids[index]
        rel = source.relpath(index) if isinstance(source, FolderSource) else image_id
        unreadable[rel] = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        late[image_id] = rel
        console.print(f"[yellow]warning:[/yellow] {escape(str(exc))}; left out", highlight=False)

    out_dir = _prepare_out(out, overwrite)
    run_id = out_dir.name
    manifest: dict[str, Any] = {
        "run_id": run_id, "status": "running", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv if Path(sys.argv[0]).name == "fluency" else None,
        "inputs": {"stimuli": stimuli.description, "checkpoints": [], "duplicate_checkpoints": duplicates},
        "metrics": metric_names, "analyses": analysis_names, "metric_columns": {},
        "options": {f"{k}.{n}": v for (k, n), v in resolved.items()},
        "settings": {"layers": list(layers) if layers else None, "device": str(dev), "batch_size": batch_size,
                     "seed": seed, "store": store, "store_dtype": store_dtype, "strict": strict},
        "versions": _versions(manager, used),
        "matching": stimuli.report.as_dict() if stimuli.report is not None else None,
        "unreadable_images": unreadable,
        "timings": timings,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)
        labels = _labels(ckpt_paths)
        with MetricTableWriter(out_dir / "metrics.parquet", run_id) as table, progress_bar(console) as bars:
            for path, label in zip(ckpt_paths, labels):
                t0 = time.perf_counter()
                loaded = load_checkpoint(path, manager, label)
                manifest["inputs"]["checkpoints"].append(
                    {"label": label, "path": str(path.resolve()), "sha256": loaded.sha256,
                     "architecture": loaded.info["architecture"], "epoch": loaded.info.get("epoch")})
                latents = _measure(loaded, stimuli, metric_specs, resolved, table, out_dir, dev, batch_size, seed,
                                   store, store_dtype, manager, bars, manifest["metric_columns"], skip_image)
                if late:  # later steps and checkpoints do not try them again
                    stimuli = _without(stimuli, late)
                timings[f"metrics[{label}]"] = round(time.perf_counter() - t0, 3)
                if figures:
                    t0 = time.perf_counter()
                    captions = write_checkpoint_figures(loaded, stimuli, out_dir, dev, pairs, batch_size, latents)
                    manifest.setdefault("figures", {"interpolate": [list(p) for p in pairs], "checkpoints": {}})
                    manifest["figures"]["checkpoints"][label] = captions
                    timings[f"figures[{label}]"] = round(time.perf_counter() - t0, 3)
        if late:  # left out of every checkpoint's metrics and of the analyses, as if found unreadable up front
            _drop_images(out_dir / "metrics.parquet", list(late))
            if stimuli.report is not None:
                _report_late(stimuli.report, late, unreadable)
                manifest["matching"] = stimuli.report.as_dict()
        metric_table = read_metric_table(out_dir / "metrics.parquet")

        t0 = time.perf_counter()
        results = _analyse(metric_table, stimuli, analysis_specs, resolved, out_dir, by, min_group_size, manifest,
                           console)
        timings["analyses"] = round(time.perf_counter() - t0, 3)
        timings["total"] = round(time.perf_counter() - started, 3)
        manifest.update(status="complete", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        outputs=sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()))
        atomic_write_json(out_dir / "manifest.json", manifest)
        return RunResult(out_dir, metric_table, results, manifest, stimuli.report, unreadable)
    except BaseException as exc:
        manifest.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                        error="".join(traceback.format_exception_only(type(exc), exc)).strip())
        timings["total"] = round(time.perf_counter() - started, 3)
        atomic_write_json(out_dir / "manifest.json", manifest)
        raise


def _measure(loaded: LoadedCheckpoint, stimuli: Stimuli, specs: dict[str, Any], resolved: dict[Any, dict[str, Any]],
             table: MetricTableWriter, out_dir: Path, dev: torch.device,
             batch_size: int, seed: int, store: bool, store_dtype: str, manager: PluginManager, bars: Any,
             directions: dict[str, Any],
             on_error: Callable[[ImageSource, int, InputError], None] | None = None) -> Latents:
    """Stream the stimuli through one checkpoint, feeding the store and every metric batch by batch.

    ``directions`` collects, per metric name in the table, its plugin and whether higher is more fluent;
    ``on_error(source, index, error)`` is called for an image that fails to load (default: raise).
    Returns the latent means μ of the images measured, read off the same forward passes (the figures
    need them; a second pass over the images would decode every file again).
    """
    model = loaded.model.to(dev).eval()
    instances: dict[str, FluencyMetric] = {}
    for name, spec in specs.items():
        instances[name] = _guarded(manager, "metric", name, lambda: spec.load()(**resolved[("metric", name)]))
    capture = list(dict.fromkeys(layer for name, m in instances.items() for layer in m.layers(model)))
    needs_model = {name for name, spec in specs.items() if spec.needs == "model"}
    channels, size, _ = model.input_shape
    source = stimuli.make_source(Preprocessing(size, channels))
    loss = loss_from_config(loaded.info.get("loss", {}))
    provenance = {"fluency_version": __version__, "checkpoint": loaded.label, "checkpoint_sha256": loaded.sha256,
                  "stimulus_fingerprint": source.fingerprint(), "preprocessing": source.describe(),
                  "seed": seed, "plugin_versions": {name: manager_version(manager, "metric", name) for name in specs}}
    writer = ActivationStoreWriter(out_dir / "activations" / loaded.label, dtype=store_dtype, provenance=provenance,
                                   overwrite=True) if store and capture else None
    task = bars.add_task(f"metrics [{loaded.label}]", total=len(source), status="")
    try:
        skip = None if on_error is None else (lambda index, exc: on_error(source, index, exc))
        latent_ids: list[str] = []
        latent_parts: list[np.ndarray] = []
        for ids, x in iter_batches(source, batch_size, on_error=skip):
            x = x.to(dev)
            with torch.no_grad(), capture_activations(model, capture) as acts:
                mu = model(x, sample=False).mu
            latent_ids += ids
            latent_parts.append(mu.flatten(1).float().cpu().numpy())
            acts = {k: v.float() for k, v in acts.items()}
            _check_finite(acts, ids, loaded.label)
            if writer is not None:
                for layer in capture:
                    writer.write(layer, ids, acts[layer])
            for name, metric in instances.items():
                bars.update(task, status=name)
                batch = MetricBatch(ids, x, acts, model, loss if name in needs_model else None, seed)
                for values in _guarded(manager, "metric", name, lambda: metric.compute(batch)):
                    directions.setdefault(values.metric, {"plugin": name, "higher_is_more_fluent":
                                                          specs[name].higher_is_more_fluent})
                    table.write(loaded.label, values.metric, values.layer, ids, values.as_numpy())
            bars.update(task, advance=len(ids), status="")
        for name, metric in instances.items():
            finished = metric.finish()
            state = metric.state()
            if state is not None:  # fitted state (e.g. typicality's Gaussians), saved for reuse
                path = out_dir / "state" / loaded.label / f"{name}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    torch.save(state, tmp)
            for ids, values in finished:
                directions.setdefault(values.metric, {"plugin": name, "higher_is_more_fluent":
                                                      specs[name].higher_is_more_fluent})
                table.write(loaded.label, values.metric, values.layer, ids, values.as_numpy())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    return Latents(latent_ids, np.concatenate(latent_parts) if latent_parts else np.zeros((0, 0), np.float32),
                   tuple(mu.shape[1:]) if latent_parts else ())


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


def _report_late(report: MatchReport, late: dict[str, str], unreadable: dict[str, str]) -> None:
    """Move the images that failed to load (``late``: id -> relative path) to the report's unreadable lists."""
    for image_id, rel in late.items():
        report.unreadable_images[rel] = unreadable[rel]
        if report.matched.pop(image_id, None) is not None:
            report.unreadable_ids.append(image_id)
        elif rel in report.unrated_images:
            report.unrated_images.remove(rel)


def _subgroups(ratings: pd.DataFrame, by: Sequence[str], min_size: int) -> tuple[list[tuple[str, pd.DataFrame]],
                                                                                   list[dict[str, Any]]]:
    """``[("all", ratings), (label, rows), ...]`` and a size report; groups under ``min_size`` are left out."""
    missing = [c for c in by if c not in ratings.columns]
    if missing:
        raise FluencyError(f"--by {','.join(by)}: no column(s) {missing} in the ratings table "
                           f"(columns: {list(ratings.columns)})")
    groups: list[tuple[str, pd.DataFrame]] = [("all", ratings)]
    report: list[dict[str, Any]] = [{"group": "all", "n": len(ratings), "analysed": True}]
    for values, rows in ratings.groupby(list(by), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{c}={v}" for c, v in zip(by, values))
        ok = len(rows) >= min_size
        report.append({"group": label, "n": len(rows), "analysed": ok,
                       **({} if ok else {"note": f"fewer than --min-group-size {min_size} rated images"})})
        if ok:
            groups.append((label, rows))
    return groups, report


def _guarded(manager: PluginManager, kind: str, name: str, call: Any) -> Any:
    """Run plugin code; an unexpected exception becomes one line naming the plugin, its package and version."""
    try:
        return call()
    except FluencyError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        raise FluencyError(f"{kind} {name!r} ({manager_version(manager, kind, name)}) failed: "
                           f"{type(exc).__name__}: {text}") from exc


def _analyse(metric_table: pd.DataFrame, stimuli: Stimuli, specs: dict[str, Any],
             resolved: dict[Any, dict[str, Any]], out_dir: Path, by: Sequence[str] = (),
             min_group_size: int = 10, manifest: dict[str, Any] | None = None,
             console: Console | None = None) -> dict[str, pd.DataFrame]:
    """Run every analysis on the rated images (and within each ``by`` subgroup), add run-wide
    BH-corrected p-values across every test, write one table per analysis; seconds per analysis go
    to ``manifest["timings"]``."""
    if stimuli.ratings is None or not specs:
        return {}
    ratings = stimuli.ratings
    with atomic_path(out_dir / "ratings.parquet") as tmp:
        ratings.to_parquet(tmp, index=False)
    groups, report = _subgroups(ratings, by, min_group_size) if by else ([("all", ratings)], [])
    if manifest is not None and by:
        manifest["subgroups"] = {"by": list(by), "min_group_size": min_group_size, "groups": report}
    results: dict[str, pd.DataFrame] = {}
    timings = manifest.setdefault("timings", {}) if manifest is not None else {}
    with progress_bar(console) as bars:
        task = bars.add_task("analyses", total=len(specs) * len(groups), status="")
        for name, spec in specs.items():
            t0 = time.perf_counter()
            analysis = spec.load()(**resolved[("analysis", name)])
            parts = []
            for label, rows in groups:
                bars.update(task, status=name if label == "all" else f"{name} [{label}]")
                data = AnalysisData(metric_table[metric_table["image_id"].isin(set(rows["image_id"]))], rows,
                                    stimuli.rating_column)
                parts.append(analysis.run(data).assign(group=label))
                bars.advance(task)
            results[name] = pd.concat(parts, ignore_index=True)
            timings[f"analysis[{name}]"] = round(time.perf_counter() - t0, 3)
        bars.update(task, status="")
    sizes = [len(r) for r in results.values()]
    p_fdr = fdr_bh(np.concatenate([r["p"].to_numpy(float) for r in results.values()])) if sum(sizes) else []
    (out_dir / "analyses").mkdir(exist_ok=True)
    start = 0
    for (name, result), size in zip(results.items(), sizes):
        result["p_fdr"] = p_fdr[start:start + size]
        start += size
        with atomic_path(out_dir / "analyses" / f"{name}.parquet") as tmp:
            result.to_parquet(tmp, index=False)
    return results


def manager_version(manager: PluginManager, kind: str, name: str) -> str:
    """``package version`` of the plugin that provides ``kind`` ``name``."""
    for record in manager.records:
        if record.kind == kind and record.name == name:
            return f"{record.package} {record.version}"
    return "?"


def _versions(manager: PluginManager, used: Sequence[tuple[str, str]]) -> dict[str, Any]:
    import pyarrow
    import scipy

    return {"fluency": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
            "scipy": scipy.__version__, "platform": platform.platform(),
            "plugins": {f"{k}.{n}": manager_version(manager, k, n) for k, n in used}}
