"""The ``fluency`` command line."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from fluency.core.version import __version__
from fluency.core.model.devices import AMP_MODES, DEVICES
from fluency.core.errors import FluencyError, PluginFailure, TaskFailure, Terminated
from fluency.core.plugin.manager import PluginManager, get_plugin_manager
from fluency.core.plugin.specs import KINDS

err = Console(stderr=True)


def _split(values: tuple[str, ...]) -> list[str]:
    """Accept repeated flags and comma-separated lists alike."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _check_plugin_names(**names: list[str]) -> None:
    """Refuse an unknown plugin name (``metric=[...]``, ``analysis=[...]``, ...) before torch loads: the plugin
    manager lists the built-ins without importing them, so a misspelt name answers at once, as the run would."""
    manager = get_plugin_manager()
    for kind, given in names.items():
        for name in given:
            manager.get(kind, name)  # type: ignore[arg-type]


def _check_options(assignments: Sequence[str], kinds: Sequence[str], plugins_only: bool = True) -> None:
    """Check each ``-o`` before torch loads: its form, that it names a plugin (``plugins_only``; training's
    losses are not plugins), and for a known plugin of ``kinds`` (or of the kind it names) the key and the
    value against the options the plugin declares, with the run's own messages. Whether the command uses
    that plugin is checked later, once its models are known."""
    import difflib

    from fluency.core.errors import OptionError
    from fluency.core.plugin.options import parse_assignment

    manager = get_plugin_manager()
    for text in assignments:
        given = parse_assignment(text, KINDS)
        names = {n for kind in ([given.kind] if given.kind else KINDS) for n in manager.names(kind)}  # type: ignore[arg-type]
        if plugins_only and given.plugin not in names:
            hint = difflib.get_close_matches(given.plugin, sorted(names), n=1)
            raise OptionError(f"-o {text}: no plugin is called {given.plugin!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else "") + " (fluency plugins lists them)")
        for kind in [given.kind] if given.kind else kinds:
            if given.plugin in manager.names(kind):  # type: ignore[arg-type]
                manager.get(kind, given.plugin).resolve({given.key: given.value})  # type: ignore[arg-type]
                break


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str, allow_nan=False))


def _jsonable(df: Any) -> list[dict[str, Any]]:
    """A table as JSON records, NaN as null, floats to full precision (pandas' ``to_json`` rounds to fixed
    decimals, which turns a p of 7.74e-10 into 8e-10)."""
    return [{str(k): _plain_value(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _plain_value(value: Any) -> Any:
    """One cell as a JSON value: numpy scalars as Python numbers, missing values as None."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain_value(value.tolist())
    import pandas as pd  # loaded already: the value came from a DataFrame

    return None if value is pd.NA or value is pd.NaT else str(value)


#: set by --debug: errors are shown with their traceback
_DEBUG = {"on": False}


def _set_debug(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    _DEBUG["on"] = bool(value)


NO_COVARIATES_HELP = ("Do not compute the low-level image covariates (image-stats) nor control the relations for "
                      "them: raw relations only.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fluency")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show the traceback of an error (e.g. a failing plugin) instead of one line.")
def cli() -> None:
    """fluency: measure how fluently a brain-like VAE processes images, and test it against beauty ratings.

    Plugins: FLUENCY_DISABLE_PLUGIN_AUTOLOAD=1 skips third-party plugins, FLUENCY_BLOCK_PLUGINS=pkg,...
    skips some, FLUENCY_STRICT_PLUGINS=1 makes a broken plugin an error. Exit status: 0 done, 2 a user
    error, 3 a plugin that failed or broke its contract, 130 interrupted by Ctrl-C, 143 by SIGTERM.
    """


@cli.command()
@click.option("--images", type=click.Path(path_type=Path), help="Folder of images (searched recursively).")
@click.option("--ratings", type=click.Path(path_type=Path), help="Ratings table (CSV or Parquet), one row per image.")
@click.option("--id-column", default="image_id", show_default=True, help="Column of image ids in the ratings table.")
@click.option("--rating-column", default="rating", show_default=True, help="Column of ratings.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(path_type=Path),
              help="Model checkpoint (repeatable); default: the embedded default model.")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Architecture measured without a checkpoint, e.g. a pretrained vgg16-imagenet (repeatable; "
                   "mixes with --checkpoint; options: -o NAME.KEY=VALUE).")
@click.option("--metric", "metrics", multiple=True, help="Metric plugin (repeatable or comma-separated); required.")
@click.option("--analysis", "analyses", multiple=True,
              help="Analysis plugin (repeatable); default with --ratings: those in registry.toml.")
@click.option("--layers", multiple=True, help="Layers the metrics read (repeatable or comma-separated).")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder; default: a new folder under runs/.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("-o", "--option", "options", multiple=True, metavar="[KIND.]PLUGIN.KEY=VALUE",
              help="Set a plugin option, e.g. -o sam.rho=0.1 (repeatable).")
@click.option("--config", type=click.Path(path_type=Path), help="TOML file with one [PLUGIN] table of options each.")
@click.option("--store-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Precision of the stored activations (metrics always use float32).")
@click.option("--no-store", is_flag=True, help="Do not write the activation store.")
@click.option("--store-layers", multiple=True, metavar="all|LAYER,...",
              help="Layers kept in the activation store (default: those the metrics read plus the model's "
                   "default metric layers; 'all': every layer).")
@click.option("--strict", is_flag=True, help="Stop on any mismatch between images and ratings.")
@click.option("--by", help="Also run every analysis within each subgroup of these ratings columns (e.g. face_sex,face_eth).")
@click.option("--min-group-size", type=click.IntRange(min=3), default=10, show_default=True,
              help="Subgroups with fewer rated images are reported, not analysed.")
@click.option("--overwrite", is_flag=True,
              help="Reuse the --out folder of an earlier run: the files that run wrote (only those) are replaced.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Correlations shown in the summary, shared among the checkpoints and subgroups.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@click.option("--interpolate", "interpolate", multiple=True, metavar="ID_A,ID_B",
              help="Draw a latent interpolation strip between these two images (repeatable); default: the "
                   "lowest- and highest-rated image.")
@click.option("--no-figures", is_flag=True,
              help="Skip the model figures (latent means, reconstructions, interpolations, training curves).")
@click.option("--rater-ratings", type=click.Path(path_type=Path),
              help="Per-rater ratings (long: id, rater, rating; or wide: one row per rater, one column per image): "
                   "the rating's reliability and noise ceiling.")
@click.option("--rater-column", default="rater", show_default=True, help="Rater column of --rater-ratings.")
@click.option("--reliability-splits", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Random rater splits (and bootstrap replicates) of the split-half reliability.")
@click.option("--deterministic", is_flag=True,
              help="One CPU thread and deterministic algorithms: results that do not depend on the thread count "
                   "(slower).")
@click.option("--no-covariates", is_flag=True, help=NO_COVARIATES_HELP)
@click.option("--check-fit", is_flag=True,
              help="Warn when the stimuli's reconstruction error exceeds the model's validation error (done "
                   "anyway when a metric decodes, e.g. recon-error).")
@click.option("--checkpoints-from", type=click.Path(path_type=Path), metavar="FILE",
              help="Text file listing checkpoints (paths, globs or folders; one per line; # comments).")
@click.option("--shard-size", type=click.IntRange(min=1), metavar="N",
              help="Images per unit of work (default: each checkpoint's images in one unit).")
@click.option("--force", is_flag=True, help="Recompute every part, even those an earlier run of --out left.")
@click.option("--fail-fast", is_flag=True,
              help="Stop at an unloadable checkpoint or a failed task (default: report it, skip, go on).")
@click.option("--resume", "resume", type=click.Path(path_type=Path), metavar="RUN_DIR",
              help="Continue the run in RUN_DIR with its recorded settings (executor options may be given anew).")
@click.option("--executor", type=click.Choice(["local", "dask", "slurm"]), default="local", show_default=True,
              help="Where the units run: this process, a Dask cluster, or SLURM jobs (pip install \"fluency[dask]\").")
@click.option("--workers", type=click.IntRange(min=1), help="Dask worker processes (default: one per GPU, else per core).")
@click.option("--scheduler", metavar="ADDRESS", help="Use the Dask cluster at ADDRESS (e.g. tcp://host:8786).")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads per unit (default: torch's in-process, 1 per Dask worker).")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Tries again a task that raised or whose worker died.")
@click.option("--slurm", "slurm", multiple=True, metavar="KEY=VALUE",
              help="SLURM setting over the --config [slurm] table (partition, account, walltime, gpus, ...).")
@click.option("--match-group", metavar="COLUMN[,COLUMN]",
              help="Measure each image only with the model trained on its subgroup (fluency train --by COLUMNS); "
                   "their rows form checkpoint matched-COLUMNS, compared with the general models.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def run(images: Path | None, ratings: Path | None, id_column: str, rating_column: str, checkpoints: tuple[Path, ...],
        models: tuple[str, ...], metrics: tuple[str, ...], analyses: tuple[str, ...], layers: tuple[str, ...], out: Path | None, device: str,
        batch_size: int, seed: int, options: tuple[str, ...], config: Path | None, store_dtype: str, no_store: bool,
        store_layers: tuple[str, ...], strict: bool, by: str | None, min_group_size: int, overwrite: bool, top: int, no_report: bool,
        interpolate: tuple[str, ...], no_figures: bool, rater_ratings: Path | None, rater_column: str,
        reliability_splits: int, deterministic: bool, no_covariates: bool, check_fit: bool,
        checkpoints_from: Path | None, shard_size: int | None, force: bool, fail_fast: bool, resume: Path | None,
        executor: str, workers: int | None, scheduler: str | None, threads: int | None, retries: int,
        slurm: tuple[str, ...], match_group: str | None, as_json: bool) -> None:
    """Compute per-image fluency metrics and relate them to ratings.

    With no --images and no --checkpoint, runs on the embedded default (generated, rated stimuli and a
    small shipped model). Example: fluency run --metric gini --metric sam
    """
    how = dict(executor=executor, workers=workers, scheduler=scheduler, threads=threads, retries=retries,
               slurm=slurm, force=force)
    if resume is not None:
        from fluency.jobs import run as run_job
        from fluency.core.run.folder import read_manifest

        manifest = read_manifest(resume)
        recorded = manifest.get("config")
        if not isinstance(recorded, dict):
            raise FluencyError(f"--resume {resume}: its manifest records no settings (a run of an earlier fluency)")
        resume = resume.resolve()
        started_in = Path(str(manifest.get("cwd") or "."))
        if started_in.is_dir():
            os.chdir(started_in)  # the recorded paths (images, checkpoints) are relative to where the run began
        result = run_job(**{**recorded, **how, "out": resume, "overwrite": False}, console=err,
                         interpolate=interpolate, figures=not no_figures, report=not no_report)
        _print_result(result, top, as_json)
        return
    if not metrics:
        raise click.MissingParameter(param_type="option", param_hint="'--metric'")
    _check_plugin_names(metric=_split(metrics), analysis=_split(analyses), architecture=_split(models))
    _check_options(options, ("metric", "analysis", "architecture"))
    from fluency.jobs import run as run_job

    result = run_job(
        metrics=_split(metrics), images=images, ratings=ratings, id_column=id_column, rating_column=rating_column,
        checkpoints=checkpoints, models=_split(models), analyses=_split(analyses) or None, layers=_split(layers) or None, out=out,
        device=device, batch_size=batch_size, seed=seed, options=options, config=config, store=not no_store,
        store_dtype=store_dtype, store_layers=_split(store_layers) or None, strict=strict, overwrite=overwrite,
        console=err, by=_split((by,)) if by else (), min_group_size=min_group_size, interpolate=interpolate,
        figures=not no_figures, rater_ratings=rater_ratings, rater_column=rater_column,
        reliability_splits=reliability_splits, deterministic=deterministic, covariates=not no_covariates,
        check_fit=check_fit, report=not no_report, checkpoints_from=checkpoints_from, shard_size=shard_size,
        fail_fast=fail_fast, match_group=_split((match_group,)) if match_group else (), **how,
    )
    _print_result(result, top, as_json)


def _print_result(result: Any, top: int, as_json: bool, seconds: float | None = None) -> None:
    """The summary of a run or measure (``seconds``: how long it took, default the run's total): relations
    table (or JSON), notes, and where the results are."""
    from fluency.core.outputs.summary import (print_matching, print_reliability, print_replicates, print_summary,
                                              print_unreadable, print_warnings, summary_rows)
    from fluency.core.run.ceiling import with_ceiling
    from fluency.core.run.replicates import strongest as strongest_replicates

    order = [c.get("label") for c in result.manifest.get("inputs", {}).get("checkpoints") or []]
    strongest, sections = summary_rows(result.strongest(None), top, order), result.sections()
    strongest = with_ceiling(strongest, result.effects(), result.manifest)  # --rater-ratings: r² ÷ ceiling
    sections = {kind: with_ceiling(rows, result.effects(), result.manifest) for kind, rows in sections.items()}
    replicates = result.replicates()  # per configuration of replicate models
    if result.report is None:  # with ratings, the matching report lists them
        print_unreadable(err, result.unreadable)
    print_matching(err, result.report)  # on stderr, so that --json keeps stdout pure JSON
    print_warnings(err, result.manifest)
    for g in result.manifest.get("subgroups", {}).get("groups", []):
        if not g["analysed"]:
            err.print(f"[yellow]subgroup {g['group']}:[/yellow] {g['n']} images, {g['note']}; not analysed")
    n_rows, n_images = result.metric_counts()
    if as_json:
        _emit_json({"run": str(result.path), "status": result.manifest["status"],
                    "n_images": n_images, "metric_rows": n_rows,
                    "strongest": _jsonable(strongest) if len(strongest) else [],
                    "other_effects": {kind: _jsonable(rows) for kind, rows in sections.items()},
                    "matching": result.manifest.get("matching"), "unreadable_images": result.unreadable,
                    "timings": result.manifest["timings"], "reliability": result.manifest.get("reliability"),
                    "warnings": result.manifest.get("warnings") or [],
                    "units": result.manifest.get("unit_counts"),
                    "failed_tasks": result.manifest.get("failed_tasks") or [],
                    "replicates": _jsonable(replicates) if len(replicates) else []})
        return
    out_console = Console()
    seconds = result.manifest["timings"].get("total") if seconds is None else seconds
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    out_console.print(f"[bold]{n_rows}[/bold] metric values for [bold]{n_images}[/bold] images{took}.")
    print_reliability(out_console, result.manifest.get("reliability"))
    print_summary(out_console, strongest, sections, result.manifest["metric_columns"], result.effects())
    print_replicates(out_console, strongest_replicates(replicates), result.effects())
    if not result.analyses:
        out_console.print("No analyses ran (pass --ratings to relate the metrics to ratings).")
    elif not len(strongest) and not sections:
        out_console.print("The analyses declare no effect size to summarise; their tables are in analyses/.")
    written = [name for name in ("report.html", "metrics.parquet", "analyses/", "analyses-replicates.parquet",
                                 "activations/", "latents/", "figures/", "manifest.json")
               if (result.path / name.rstrip("/")).exists()]
    out_console.print(f"Results in [bold]{result.path}[/bold]: {', '.join(written)}")


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--metric", "metrics", multiple=True, required=True,
              help="Activation metric plugin (repeatable or comma-separated).")
@click.option("--analysis", "analyses", multiple=True,
              help="Analysis plugin (default: the run's analyses, else the registry's defaults).")
@click.option("--ratings", type=click.Path(path_type=Path),
              help="Ratings table whose ids are the store's image ids (default: the run's ratings).")
@click.option("--id-column", default="image_id", show_default=True, help="Column of image ids in the ratings table.")
@click.option("--rating-column", help="Column of ratings (default: the run's, else 'rating').")
@click.option("--images", type=click.Path(path_type=Path),
              help="Folder of the stored images, for metrics that read images (image-stats).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for the results; default: the run folder itself, or a new folder under runs/.")
@click.option("-o", "--option", "options", multiple=True, metavar="[KIND.]PLUGIN.KEY=VALUE",
              help="Plugin option (repeatable), e.g. -o gini.layers=[enc5].")
@click.option("--config", type=click.Path(path_type=Path), help="TOML file with one [PLUGIN] table of options each.")
@click.option("--replace", is_flag=True, help="Replace a metric the run already has with other options.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per batch read from the store.")
@click.option("--by", help="Also run every analysis within each subgroup of these ratings columns "
              "(default: the run's).")
@click.option("--min-group-size", type=click.IntRange(min=3), help="Smallest subgroup analysed (default: the run's, "
              "else 10).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Correlations shown in the summary, shared among the checkpoints and subgroups.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@click.option("--no-covariates", is_flag=True, help=NO_COVARIATES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def measure(target: Path, metrics: tuple[str, ...], analyses: tuple[str, ...], ratings: Path | None, id_column: str,
            rating_column: str | None, images: Path | None, out: Path | None, options: tuple[str, ...],
            config: Path | None, replace: bool, batch_size: int, by: str | None, min_group_size: int | None, top: int,
            no_report: bool, no_covariates: bool, as_json: bool) -> None:
    """Compute activation metrics (then analyses) from a completed activation store or run folder.

    No model and no images are needed: TARGET is a store (e.g. RUN/activations/default) or a run folder,
    to which the new metrics are added. Example: fluency measure runs/my-run --metric hoyer
    """
    _check_plugin_names(metric=_split(metrics), analysis=_split(analyses))
    _check_options(options, ("metric", "analysis"))
    from fluency.jobs import measure as measure_job

    result = measure_job(str(target), _split(metrics), analyses=_split(analyses) or None, ratings=ratings,
                         id_column=id_column, rating_column=rating_column, images=images, out=out, options=options,
                         config=config, replace=replace, batch_size=batch_size, by=_split((by,)) if by else None,
                         min_group_size=min_group_size, console=err, report=False if no_report else True,
                         covariates=not no_covariates)
    _print_result(result, top, as_json, result.manifest["measured"][-1]["timings"]["total"])


@cli.group()
def store() -> None:
    """Activation stores: import activations saved by other tools, describe a store."""


@store.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--ids", "ids", required=True, type=click.Path(path_type=Path),
              help="Text file with one image id per line, in the order of the activations' rows.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder of the new store.")
@click.option("--layers", multiple=True, help="Layers to import, in this order (default: all, sorted by name).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True,
              help="Value type of the store.")
@click.option("--architecture", default="imported", show_default=True, help="Name recorded for the model.")
def store_import(source: Path, ids: Path, out: Path, layers: tuple[str, ...], dtype: str, architecture: str) -> None:
    """Turn activations saved by another tool into a fluency store.

    SOURCE is a folder with one sub-folder per layer holding features.npy (as thingsvision's save_features
    writes), or an .npz or HDF5 (.h5/.hdf5) file with one array per layer; every array is N×... with N the
    number of ids.
    """
    from fluency.core.run.importing import import_store

    path = import_store(source, ids, out, layers=_split(layers) or None, dtype=dtype, architecture=architecture,
                        console=err)
    Console().print(f"Store: [bold]{path}[/bold] (measure it with `fluency measure {path} --metric gini`)")


@store.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON on stdout.")
def store_info(path: Path, as_json: bool) -> None:
    """Describe a store: layers with shape and dtype, image count, model and provenance."""
    from fluency.core.outputs.summary import store_table
    from fluency.core.run.store import ActivationStore

    found = ActivationStore(path)
    info = {"path": str(found.path), "format_version": found.format_version, "rows": found.num_rows(found.layers[0])
            if found.layers else 0, "layers": {name: {"shape": list(found.shape(name)), "dtype": found.dtype(name).name,
                                                      "rows": found.num_rows(name)} for name in found.layers},
            "model": found.description.as_dict(), "provenance": found.provenance}
    if as_json:
        _emit_json(info)
        return
    Console().print(store_table(info))


@cli.command()
@click.option("--arch", "architecture", help="Architecture plugin (default vae-small).")
@click.option("--images", type=click.Path(path_type=Path), help="Folder of training images (recursive).")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the checkpoints (final.pt), history, figures.")
@click.option("--epochs", type=click.IntRange(min=1), help="Number of epochs (default 10).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per step (default 32).")
@click.option("--image-size", type=click.IntRange(min=8), help="Input height and width (default 64).")
@click.option("--resize", type=click.Choice(["shorter-side+center-crop", "stretch"]),
              help="Keep the aspect ratio and crop the centre (default), or stretch.")
@click.option("--optimizer", help="Optimizer plugin (default adam).")
@click.option("--lr", type=float, help="Learning rate (sets the optimizer's lr option).")
@click.option("--schedule", type=click.Choice(["none", "cosine", "step", "linear-warmup-cosine"]),
              help="Learning-rate schedule (default none).")
@click.option("--schedule-step-size", type=click.IntRange(min=1),
              help="With --schedule step: epochs between decays (default a third of the run).")
@click.option("--schedule-gamma", type=click.FloatRange(min=0, min_open=True),
              help="With --schedule step: factor applied at each decay (default 0.1).")
@click.option("--warmup-epochs", type=click.IntRange(min=0),
              help="With --schedule linear-warmup-cosine: epochs of linear warm-up (default 1).")
@click.option("--loss", "losses", multiple=True, metavar="NAME[:WEIGHT]",
              help="Reconstruction loss term: l2, l1, ssim, lpips, dfc (repeatable; default l2).")
@click.option("--constraint", "constraints", multiple=True, help="Constraint plugin added to the loss (repeatable).")
@click.option("--beta", type=float, help="Weight of the KL term (default 1).")
@click.option("--beta-warmup", type=click.IntRange(min=0), help="Epochs over which beta rises linearly from 0.")
@click.option("--val-fraction", type=float, help="Seeded validation split (default 0.1).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Also keep epoch-NNN.pt every N epochs.")
@click.option("--device", type=click.Choice(DEVICES))
@click.option("--workers", metavar="N|auto", help="Processes decoding the images while the model trains (0: in the "
              "training process; default auto: one per core but one, at most 4, none on 2 cores when training on "
              "the CPU). The trained model does not depend on it.")
@click.option("--amp", type=click.Choice(AMP_MODES), help="Mixed precision of the forward pass: bf16 (CPU or GPU) or "
              "fp16 (CUDA, with a gradient scaler); default off.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1))
@click.option("--seeds", metavar="RANGES", help="Train one replicate model per seed into OUT/seed-<k>/ (e.g. 1-10, "
              "1,3,5 or 1-3,8); finished seeds are skipped when the command is repeated.")
@click.option("--replicate-of", "replicate_label", metavar="NAME",
              help="Label the model(s) as replicates of the configuration NAME (default: a hash of the settings).")
@click.option("--no-figures", is_flag=True, default=None, help="Skip the training curves and reconstruction grids.")
@click.option("-o", "--option", "options", multiple=True, metavar="[KIND.]PLUGIN.KEY=VALUE",
              help="Set a plugin or loss option, e.g. -o adam.beta1=0.5 -o lpips.net=vgg (repeatable).")
@click.option("--config", type=click.Path(path_type=Path),
              help="TOML file: a [train] table of these settings and one table per plugin or loss.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier training run (or yours) in --out.")
@click.option("--ratings", type=click.Path(path_type=Path), help="With --by: the table that defines subgroups.")
@click.option("--id-column", default="image_id", show_default=True, help="Id column of --ratings.")
@click.option("--by", help="Train one model per subgroup of these --ratings columns (e.g. face_sex,face_eth).")
@click.option("--min-group-size", type=click.IntRange(min=2), default=16, show_default=True,
              help="Subgroups with fewer images are refused.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def train(options: tuple[str, ...], config: Path | None, resume: bool, overwrite: bool, ratings: Path | None,
          id_column: str, by: str | None, min_group_size: int, as_json: bool, losses: tuple[str, ...],
          constraints: tuple[str, ...], no_figures: bool | None, seeds: str | None, replicate_label: str | None,
          **flags: Any) -> None:
    """Train a VAE on a folder of images; the final checkpoint is OUT/final.pt (OUT/seed-<k>/final.pt with
    --seeds)."""
    _check_plugin_names(architecture=[flags["architecture"]] if flags.get("architecture") else [],
                        optimizer=[flags["optimizer"]] if flags.get("optimizer") else [], constraint=list(constraints))
    _check_options(options, ("architecture", "optimizer", "constraint"), plugins_only=False)
    replicas = _replicate_flags(seeds, replicate_label, flags.get("seed"), by)
    from fluency.core.outputs.training_figures import TrainingFigures
    from fluency.core.plugin.config import read_config
    from fluency.core.train.training import TrainConfig, train as train_model, train_by_group

    file = read_config(config)
    settings = dict(file.get("train", {}))
    settings.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
    if losses:
        settings["losses"] = list(losses)
    if constraints:
        settings["constraints"] = list(constraints)
    if no_figures:
        settings["figures"] = False
    settings["options"] = [*settings.get("options", []), *options]
    cfg = TrainConfig.from_mapping(settings, f"--config {config}" if config else "train")
    plugin_tables = {k: v for k, v in file.items() if k != "train"}
    observer = TrainingFigures() if cfg.figures else None
    if replicas is not None:
        _train_replicates(cfg, replicas, replicate_label, resume, overwrite, plugin_tables, observer, as_json)
        return
    if by:
        if ratings is None:
            raise FluencyError("--by needs --ratings (the table with the grouping columns)")
        sets = train_by_group(cfg, ratings, id_column, [c.strip() for c in by.split(",") if c.strip()],
                              min_group_size, console=err, plugin_config=plugin_tables, observer=observer,
                              overwrite=overwrite)
        if as_json:
            _emit_json(sets)
        else:
            for row in sets["groups"]:
                note = row.get("checkpoint") or f"refused: {row['refused']}"
                Console().print(f"{row['label']}: {row['n_images']} images → {note}")
        return
    result = train_model(cfg, console=err, resume=resume, overwrite=overwrite, plugin_config=plugin_tables,
                         observer=observer, replicate_label=replicate_label)
    if as_json:
        _emit_json({"checkpoint": str(result.checkpoint), "history": result.history, "seconds": result.seconds,
                    "warnings": result.warnings})
    else:
        last = result.history[-1] if result.history else {}
        terms = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "beta", "lr", "seconds"))
        Console().print(f"Trained to epoch {last.get('epoch')} in {result.seconds:.1f} s ({terms}); "
                        f"checkpoint: {result.checkpoint}")


def _replicate_flags(seeds: str | None, label: str | None, seed: int | None, by: str | None) -> Any:
    """The parsed ``--seeds`` (None without), its conflicts refused and ``--replicate-of`` checked, before torch
    loads."""
    from fluency.core.model.replicates import check_label
    from fluency.core.train.seeds import RangeSpec

    if label is not None:
        check_label(label)
    if seeds is None:
        return None
    if seed is not None:
        raise FluencyError("--seeds and --seed: give one (--seeds trains a model per seed, --seed one model)")
    if by:
        raise FluencyError("--seeds and --by: train the replicates of one configuration at a time (one --out per "
                           "subgroup's images), or train the subgroups with --by and one --seed")
    return RangeSpec.parse(seeds)


def _train_replicates(cfg: Any, seeds: Any, label: str | None, resume: bool, overwrite: bool,
                      plugin_tables: dict[str, Any], observer: Any, as_json: bool) -> None:
    """``fluency train --seeds``: one model per seed, then a line per model (or the JSON summary)."""
    from fluency.core.train.replicates import train_seeds

    summary = train_seeds(cfg, list(seeds), console=err, resume=resume, overwrite=overwrite,
                          plugin_config=plugin_tables, observer=observer, replicate_label=label)
    if as_json:
        _emit_json(summary)
        return
    out = Console()
    for model in summary["models"]:
        done = "skipped, already trained" if model["skipped"] else f"trained in {model['seconds']:.1f} s"
        out.print(f"seed {model['seed']}: {done} → {model['checkpoint']}", highlight=False)
    out.print(f"{len(summary['models'])} replicates of configuration {summary['configuration']} in {cfg.out}",
              highlight=False)


@cli.group()
def checkpoints() -> None:
    """Look into checkpoint files."""


@checkpoints.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def checkpoints_inspect(path: Path, as_json: bool) -> None:
    """Describe a checkpoint: architecture and options, loss, optimizer, data, epochs, final losses."""
    from fluency.core.model.checkpoint import describe_checkpoint

    info = describe_checkpoint(path)
    if as_json:
        _emit_json(info)
        return
    table = Table(title=str(path), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in info.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, default=str))
    Console().print(table)


@cli.command()
@click.option("--model", "model", metavar="NAME", help="An architecture, built without a checkpoint.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A checkpoint file.")
@click.option("-o", "--option", "options", multiple=True, metavar="NAME.KEY=VALUE",
              help="An option of the --model architecture (repeatable), as for `fluency run`.")
@click.option("--config", type=click.Path(path_type=Path), help="TOML file with one [PLUGIN] table of options each.")
@click.option("--size", type=click.IntRange(min=8), default=224, show_default=True,
              help="Side of the probe image for a model that takes any size.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(model: str | None, checkpoint: Path | None, options: tuple[str, ...], config: Path | None, size: int,
            as_json: bool) -> None:
    """List a model's layers (the names --layers and -o METRIC.layers take) with their output shapes."""
    if (model is None) == (checkpoint is None):
        raise click.UsageError("name one of --model NAME or --checkpoint PATH")
    _check_plugin_names(architecture=[model] if model else [])
    _check_options(options, ("architecture",))
    from fluency.core.run.checkpoints import inspect_model

    info = inspect_model(model, checkpoint, options, config, size)
    if as_json:
        _emit_json(info)
        return
    console = Console()
    console.print(f"[bold]{info['label']}[/bold]: {info['architecture']} ({info['kind']}; provides "
                  f"{', '.join(info['provides']) or 'activations only'}); input {info['input']}; weights sha256 "
                  f"{info['sha256'][:12]}…", highlight=False)
    table = Table(title=f"layers (output shape for a {info['probe']} image)")
    for col, justify in (("layer", "left"), ("output shape", "right"), ("measured by default", "center")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in info["layers"]:
        table.add_row(row["name"], "×".join(map(str, row["shape"])), "yes" if row["default"] else "")
    console.print(table)


class _ListOrSubcommand(click.Group):
    """A group that is also a command: ``fluency plugins [PATTERN] [--kind K] [--json]`` lists plugins, and a
    first word naming a subcommand (``fluency plugins new ...``) runs that instead. Options may follow PATTERN,
    as they could when ``plugins`` was a plain command."""

    allow_interspersed_args = True

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in self.commands:
            # the group's own parameters keep their defaults ("*" fills PATTERN); the subcommand parses the rest
            super().parse_args(ctx, ["*", args[0]])
            ctx.args = list(args[1:])
            return ctx.args
        return super().parse_args(ctx, args)


class _PatternArgument(click.Argument):
    """PATTERN of ``fluency plugins``, left out of a subcommand's usage ("fluency plugins new ...")."""

    def get_usage_pieces(self, ctx: click.Context) -> list[str]:
        # a subcommand's context (click 8.2+), or the group's while it runs a subcommand (click 8.1)
        subcommand = not isinstance(ctx.command, _ListOrSubcommand) or ctx.invoked_subcommand
        return [] if subcommand else super().get_usage_pieces(ctx)


@cli.group(cls=_ListOrSubcommand, invoke_without_command=True, subcommand_metavar="| new KIND NAME [--dir DIR]")
@click.argument("pattern", default="*", cls=_PatternArgument)
@click.option("--kind", type=click.Choice(KINDS), help="Only plugins of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list, with each plugin's options.")
@click.pass_context
def plugins(ctx: click.Context, pattern: str, kind: str | None, as_json: bool) -> None:
    """List plugins (optionally matching a glob PATTERN such as 'g*'): kind, name, package, status.

    `fluency plugins new KIND NAME` writes a new plugin package instead (see `fluency plugins new --help`).
    """
    if ctx.invoked_subcommand is not None:
        return
    manager = get_plugin_manager()
    rows = manager.list(pattern, kind)  # type: ignore[arg-type]
    if as_json:
        _emit_json([r.as_dict() for r in rows])
        return
    table = Table(title="fluency plugins")
    for col in ("kind", "name", "package", "version", "status", "description"):
        table.add_column(col)
    colours = {"ok": "green", "broken": "red", "blocked": "yellow"}
    for r in rows:
        text = r.description if r.status == "ok" else (r.error or r.description)
        table.add_row(r.kind or "?", r.name, r.package, r.version, f"[{colours[r.status]}]{r.status}[/]", text)
    Console().print(table)


#: the kinds of ``fluency plugins new``, in the order they are offered
NEW_KINDS = ("metric", "analysis", "architecture", "constraint", "optimizer")


@plugins.command("new", short_help="Write a new plugin package (fluency-NAME) that works as written.")
@click.argument("kind", type=click.Choice(NEW_KINDS), metavar="KIND")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path),
              help="Folder of the new package (default: ./fluency-NAME); it must not exist or be empty.")
def plugins_new(kind: str, name: str, directory: Path | None) -> None:
    """Write a new plugin package: a small, working plugin of KIND called NAME, with its tests and README.

    KIND is metric, analysis, architecture, constraint or optimizer.

    The package (distribution fluency-NAME, import package fluency_NAME) installs with pip, is found
    through its entry point and passes its tests as written: edit src/fluency_NAME/plugin.py to make
    it yours. Example: fluency plugins new metric my-metric
    """
    from fluency.scaffold import new_plugin

    made = new_plugin(kind, name, directory)
    shown = str(directory) if directory is not None else made.distribution
    click.echo(f"Wrote the {kind} plugin {name!r} (package {made.distribution}, import {made.package}) "
               f"in {shown}/:")
    for relative in made.files:
        click.echo(f"  {relative}")
    click.echo("Next steps:")
    for step in made.next_steps(shown):
        click.echo(f"  {step}")


@cli.command()
@click.argument("target", required=False)
def schema(target: str | None) -> None:
    """Print the options of every plugin (or of KIND.NAME) as JSON: type, default, help, choices.

    ``default`` is what a run uses (registry.toml over the plugin's own); ``declared_default`` is the
    plugin's own where the two differ.
    """
    manager: PluginManager = get_plugin_manager()
    records = [r for r in manager.list() if r.spec is not None and r.status == "ok"]
    if target:
        kind, _, name = target.rpartition(".")
        records = [r for r in records if r.name == name and (not kind or r.kind == kind)]
        if not records:
            raise FluencyError(f"schema: no plugin {target!r}; see `fluency plugins`")
    _emit_json({f"{r.kind}.{r.name}": r.as_dict()["options"] for r in records})


@cli.command()
@click.argument("dir_a", type=click.Path(path_type=Path))
@click.argument("dir_b", type=click.Path(path_type=Path))
@click.option("--metric", "metrics", multiple=True, default=("lpips",), show_default=True,
              help="lpips, l1, l2, 1-ssim (1 − SSIM; ssim is accepted), repeatable or comma-separated.")
@click.option("--image-size", type=click.IntRange(min=16), metavar="N",
              help="Resize both images of each pair first: shorter side to N (Lanczos), then the centre N×N crop. "
                   "Default: each pair at its own size (both images must be the same size).")
@click.option("-o", "--option", "options", multiple=True, metavar="[KIND.]PLUGIN.KEY=VALUE",
              help="Option of the lpips metric plugin, as for `run`: -o lpips.net=vgg, -o lpips.weights=PATH.")
@click.option("--config", type=click.Path(path_type=Path), help="TOML file with one [PLUGIN] table of options each.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the table here (.csv or .parquet).")
@click.option("--json", "as_json", is_flag=True, help="Print the table, the settings and the unpaired files as JSON.")
def compare(dir_a: Path, dir_b: Path, metrics: tuple[str, ...], image_size: int | None, options: tuple[str, ...],
            config: Path | None, device: str, out: Path | None, as_json: bool) -> None:
    """Distances between the images with the same relative path in DIR_A and DIR_B, at their own size.

    Example: fluency compare originals/ morphs/ --metric lpips,1-ssim -o lpips.net=vgg
    """
    from fluency.core.run.compare import chosen_metrics, compare as run_compare
    from fluency.core.model.devices import resolve_device

    chosen = chosen_metrics(_split(metrics))  # before the device: a misspelt name answers without torch
    result = run_compare(dir_a, dir_b, chosen, image_size, options=options, config=config,
                         device=str(resolve_device(device)))
    if out is not None:
        from fluency.core.atomic import atomic_path

        with atomic_path(out) as tmp:
            (result.table.to_parquet if out.suffix in (".parquet", ".pq") else result.table.to_csv)(tmp, index=False)
    if as_json:
        _emit_json({"pairs": _jsonable(result.table), "settings": result.settings, "only_in_a": result.only_in_a,
                    "only_in_b": result.only_in_b})
        return
    for name, files in (("only in " + str(dir_a), result.only_in_a), ("only in " + str(dir_b), result.only_in_b)):
        if files:
            err.print(f"[yellow]{len(files)} image(s) {name}[/yellow]: {', '.join(files[:10])}"
                      f"{' …' if len(files) > 10 else ''}")
    summary = result.table.groupby("metric")["value"].describe()[["count", "mean", "std", "min", "max"]]
    size = result.settings["image_size"]
    table = Table(title=f"{dir_a} vs {dir_b} ({'own size' if size == 'native' else f'{size}×{size}'})")
    for col in ("metric", *summary.columns):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, row in summary.iterrows():
        table.add_row(str(metric), *(f"{v:.4g}" for v in row))
    Console().print(table)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.html: figures, sortable tables and provenance in one self-contained file."""
    from fluency.core.outputs.report import build_report

    Console().print(f"Report: {build_report(run_dir)}")


@cli.group()
def demo() -> None:
    """The embedded default stimuli (generated, rated images)."""


@demo.command("export")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Number of images (default: as embedded).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Generator seed (default: as embedded).")
@click.option("--overwrite", is_flag=True, help="Replace FOLDER/ratings.csv and images of the same names.")
def demo_export(folder: Path, n: int | None, seed: int | None, overwrite: bool) -> None:
    """Write the embedded stimuli to FOLDER/images/*.png and FOLDER/ratings.csv."""
    from fluency.core.inputs import demo as demo_module

    demo_module.export(folder, n or demo_module.DEFAULT_N, demo_module.DEFAULT_SIZE,
                       demo_module.DEFAULT_SEED if seed is None else seed, overwrite=overwrite)
    Console().print(f"Wrote {folder}/images/ and {folder}/ratings.csv")


@cli.command("runs")
@click.argument("directory", default="runs", type=click.Path(path_type=Path), metavar="[DIR]")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as a JSON list of objects on stdout.")
def runs_command(directory: Path, as_json: bool) -> None:
    """List the fluency runs below DIR (default: runs), newest first: started, folder, checkpoints, stimuli,
    metrics, status (a run killed while running reads "incomplete").

    Example: fluency runs runs/ --json
    """
    from fluency.core.run.history import find_runs

    found = find_runs(directory)
    _print_notes(found.notes)
    if as_json:
        _emit_json([info.as_dict() for info in found.runs])
        return
    if not found.runs:
        click.echo(f"No fluency runs below {directory}.")
        return
    from fluency.core.outputs.listing import runs_table

    console = Console()
    console.print(runs_table(found.runs, console.width))


@cli.command("query")
@click.argument("sql")
@click.argument("directory", default="runs", type=click.Path(path_type=Path), metavar="[DIR]")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="How the rows are printed on stdout.")
@click.option("--max-rows", type=click.IntRange(min=0), default=50, show_default=True,
              help="Rows the table shows (0: all); csv and json print every row.")
def query_command(sql: str, directory: Path, fmt: str, max_rows: int) -> None:
    """Run DuckDB SQL over every run below DIR (default: runs). Views: metrics (every metrics.parquet, with
    run_dir), analyses (every analyses/*.parquet, with analysis and run_dir), runs (one row per run).

    Needs DuckDB: pip install "fluency[query]". See docs/querying.md. Example:
    fluency query "select checkpoint, avg(value) from metrics where metric = 'gini' group by checkpoint"
    """
    from fluency.core.run.sql import query

    result = query(sql, directory)
    _print_notes(result.notes)
    from fluency.core.outputs.listing import csv_text, json_records, result_table

    if fmt == "json":
        _emit_json(json_records(result))
    elif fmt == "csv":
        click.echo(csv_text(result), nl=False)
    else:
        console = Console()
        console.print(result_table(result, console.width, max_rows))


def _print_notes(notes: Sequence[str]) -> None:
    """One ``note:`` line on stderr each (a folder or file left out)."""
    from rich.markup import escape

    for note in notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)


#: the exit status of a command interrupted by each signal (128 + its number, as shells report it)
INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}


def _interrupted(exc: BaseException) -> NoReturn:
    """Ctrl-C (SIGINT) or SIGTERM: say what is kept (as the user guide does) and exit with 130 or 143."""
    name = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
    err.print(f"[red]interrupted[/red] ({name}): finished results are kept; a run folder's manifest.json says "
              "status \"interrupted\" (`fluency train --resume` continues a training run)", highlight=False)
    sys.exit(INTERRUPTED[name])


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop like Ctrl-C (a second SIGTERM ends the process at once)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated("SIGTERM")


def main() -> None:
    """Entry point: user errors become one red line and exit status 2; bugs keep their traceback.

    Exit status (docs/user-guide.md, "Exit status"): 0 done, 1 a bug (traceback), 2 a user error, 3 a plugin
    failure, 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM.
    """
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        _main()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C (and SIGTERM) into Abort
            _interrupted(exc.__cause__)
        err.print("[red]aborted[/red]")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FluencyError as exc:
        from rich.markup import escape

        if _DEBUG["on"]:
            err.print_exception()
        plugin = isinstance(exc, PluginFailure)
        err.print(f"[red]{'plugin error' if plugin else 'error'}:[/red] {escape(str(exc))}"
                  + ("" if _DEBUG["on"] or not plugin else " (--debug shows the traceback)"),
                  highlight=False, soft_wrap=True)
        sys.exit(3 if plugin else 1 if isinstance(exc, TaskFailure) else 2)
    except KeyboardInterrupt as exc:
        _interrupted(exc)


if __name__ == "__main__":
    main()
