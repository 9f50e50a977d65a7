"""``fluency train``: fit an Architecture plugin's model to a folder of images.

Per image, the loss is the architecture's objective (for a VAE Σ_k w_k·recon_k, see
:mod:`fluency.core.model.losses`, + β(epoch)·KL, where β rises linearly from 0 over
``beta_warmup`` epochs; for a flow the negative log-likelihood in bits per dimension)
+ Σ_c θ_c·constraint_c. The optimizer (a plugin) is always stepped with a closure,
so SAM's two passes work; BatchNorm statistics are protected by the optimizer.

A model that declares ``fitted_in_one_pass`` (the ``sparse-coding`` dictionary) is
fitted by its own ``fit`` in one pass over the training images instead: no optimizer,
loss, epochs or ``last.pt``; ``final.pt`` and a one-row ``history.parquet`` as usual.
Other encoder-only models are not trained.

Everything lands in ``out/``:

- ``last.pt`` after every epoch (what ``--resume`` continues from), ``epoch-NNN.pt``
  every ``checkpoint_every`` epochs and ``final.pt`` at the end: one self-describing
  file each (:mod:`fluency.core.model.checkpoint`), with the RNG, optimizer and scheduler
  states needed to resume exactly;
- ``history.parquet``: one row per epoch (train and validation loss terms, lr, time);
- ``config.toml``: the resolved configuration (``fluency train --config out/config.toml``
  repeats the run);
- ``figures/curves.png`` and ``figures/recon-epoch-NNN.png`` (validation images above
  their reconstructions), drawn after each epoch by a :class:`TrainingObserver` from the
  output layer (:mod:`fluency.core.outputs.training_figures`), which the CLI passes unless
  ``--no-figures``; this module draws nothing itself.

A NaN or infinite loss stops training with a message; ``last.pt`` keeps the last
good epoch.

Images are decoded by ``workers`` processes (:mod:`fluency.core.train.loading`; the trained weights do not
depend on their number) and the forward pass may run in mixed precision, ``amp``
(:mod:`fluency.core.train.precision`).

Every checkpoint also records what ``fluency run`` checks a model against
(:mod:`fluency.core.model.diagnostics`), measured after each epoch on the validation images with z = μ:
``fit`` (the per-image reconstruction error: loss, n, mean, sd, p50, p95), ``latent`` (KL per dimension and
the number of active dimensions) and, with constraints, ``sparsity`` (per constrained layer the constraint's
target and the mean activation reached, also logged as the history column ``mean_act[LAYER]``). Training
ends with a ``warning:`` line when the latent collapsed or a constraint's target was not reached.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.markup import escape

from fluency.core.version import __version__
from fluency.core.atomic import atomic_path, atomic_write_text
from fluency.core.model.capture import capture_activations
from fluency.core.model.checkpoint import check_training_state, plain, read_checkpoint, save_checkpoint
from fluency.core.model.diagnostics import (ErrorSummary, LatentActivity, collapse_warning, loss_name,
                                            sparsity_warnings)
from fluency.core.plugin.config import resolve_plugin_options
from fluency.core.model.devices import resolve_device
from fluency.core.errors import CheckpointError, FluencyError, OptionError, TrainingError, error_text
from fluency.core.inputs.images import RESIZE, FolderSource, Preprocessing, find_images, scan_images
from fluency.core.model.losses import LOSSES, ReconstructionLoss, parse_loss_terms
from fluency.core.model.replicates import check_label, configuration_id
from fluency.core.plugin.architecture import ObjectiveSettings, VAEOutput
from fluency.core.plugin.options import check_seed
from fluency.core.plugin.manager import PluginManager, get_plugin_manager
from fluency.core.progress import progress_bar
from fluency.core.train.loading import (Order, batches, epoch_order, fresh_pass, image_loader, parse_workers,
                                        worker_count)
from fluency.core.train.precision import Precision, check_amp, check_amp_optimizer, to_float32
from fluency.core.train.schedules import build_scheduler


@dataclass
class TrainConfig:
    """Every setting of a training run (the CLI flags; ``[train]`` in a config file)."""

    images: str = ""
    out: str = ""
    architecture: str = "vae-small"
    optimizer: str = "adam"
    losses: list[str] = field(default_factory=lambda: ["l2"])
    constraints: list[str] = field(default_factory=list)
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 64
    resize: str = RESIZE
    lr: float | None = None
    beta: float = 1.0
    beta_warmup: int = 0
    schedule: str = "none"
    schedule_step_size: int | None = None
    schedule_gamma: float = 0.1
    warmup_epochs: int = 1
    val_fraction: float = 0.1
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "auto"
    #: image-decoding processes (:mod:`fluency.core.train.loading`): a number, or ``auto``
    workers: int | str = "auto"
    #: mixed precision of the forward pass (:mod:`fluency.core.train.precision`): off, bf16 or fp16
    amp: str = "off"
    figures: bool = True
    options: list[str] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionError(f"{where}: unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    def check(self) -> None:
        if not self.images:
            raise OptionError("train: --images is required")
        if not self.out:
            raise OptionError("train: --out is required")
        for name in ("epochs", "batch_size", "image_size"):
            if int(getattr(self, name)) < 1:
                raise OptionError(f"train: {name} must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise OptionError("train: val_fraction must be in [0, 1)")
        if self.beta < 0 or self.beta_warmup < 0:
            raise OptionError("train: beta and beta_warmup must be non-negative")
        check_seed(self.seed)
        if self.lr is not None and not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise OptionError(f"--lr {self.lr!r}: the learning rate must be a positive, finite number")
        parse_loss_terms(self.losses)
        parse_workers(self.workers)
        check_amp(self.amp)


@dataclass
class TrainResult:
    """Where the final checkpoint went and how the loss evolved."""

    checkpoint: Path
    history: list[dict[str, float]]
    seconds: float
    #: the warnings about the final model (:mod:`fluency.core.model.diagnostics`), each printed once
    warnings: list[dict[str, str]] = field(default_factory=list)
    #: the replicate configuration recorded in the checkpoints (:mod:`fluency.core.model.replicates`)
    configuration: str | None = None


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A minimal TOML writer for flat settings and one level of tables (enough for ``config.toml``)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines, tables = [], []
    for key, v in data.items():
        if isinstance(v, Mapping):
            tables.append((key, v))
        elif v is not None:
            lines.append(f"{key} = {value(v)}")
    for name, table in tables:
        nested = [(k, t) for k, t in table.items() if isinstance(t, Mapping)]
        flat = [f"{k} = {value(t)}" for k, t in table.items() if not isinstance(t, Mapping) and t is not None]
        if flat or not nested:
            lines += ["", f"[{name}]", *flat]
        for k, t in nested:
            lines += ["", f"[{name}.{k}]", *(f"{a} = {value(b)}" for a, b in t.items() if b is not None)]
    return "\n".join(lines).strip() + "\n"


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split; at least one validation image when the fraction is positive."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = 0 if val_fraction <= 0 or n < 2 else max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def beta_at(epoch: int, beta: float, warmup: int) -> float:
    """β for 1-based ``epoch``: linear from β/warmup to β over the warm-up epochs, then β."""
    return beta if warmup <= 0 else beta * min(1.0, epoch / warmup)


@dataclass(frozen=True)
class EpochEnd:
    """What a :class:`TrainingObserver` sees once an epoch's checkpoint and history are written."""

    epoch: int
    history: Sequence[Mapping[str, float]]  # every epoch so far, this one last
    model: torch.nn.Module
    source: FolderSource
    val_indices: Sequence[int]
    out: Path
    device: torch.device


class TrainingObserver(Protocol):
    """Told about each finished epoch; how figures reach ``out/figures`` without the train layer drawing them."""

    def epoch_end(self, state: EpochEnd) -> None: ...


@dataclass(frozen=True)
class _Options:
    """The resolved options of a run's reconstruction losses and plugins."""

    loss_terms: list[dict[str, Any]]
    architecture: dict[str, Any]
    optimizer: dict[str, Any]
    constraints: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class _Run:
    """What one training run works with, built once by :func:`_build`; the loop steps its model and optimizer."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    model: Any
    recon_loss: ReconstructionLoss | None
    loss_terms: list[dict[str, Any]]
    constraints: dict[str, Any]
    capture: list[str]
    source: FolderSource
    train_idx: list[int]
    val_idx: list[int]
    optimizer: Any
    scheduler: Any
    workers: int
    precision: Precision

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_idx) / self.cfg.batch_size)


#: settings that ``--resume`` takes from the interrupted run (they shape the model, data or optimisation)
RESUMED_SETTINGS = ("architecture", "optimizer", "losses", "constraints", "image_size", "resize", "batch_size",
                    "seed", "val_fraction", "beta", "beta_warmup", "schedule", "schedule_step_size",
                    "schedule_gamma", "warmup_epochs", "options", "lr", "amp")


#: what a training run writes in ``out`` (patterns; the figures are those of the CLI's observer): an existing one
#: is replaced only with ``--overwrite`` (or ``--resume``, which continues the run that wrote them)
TRAIN_OUTPUTS = ("final.pt", "last.pt", "epoch-*.pt", "history.parquet", "config.toml", "checkpoints.json",
                 "figures/curves.png", "figures/recon-epoch-*.png")


def check_out(out: Path, images: Path, overwrite: bool) -> None:
    """One line if ``out`` is inside ``images``, is a file, or (without ``overwrite``) holds a file training writes."""
    if out.resolve().is_relative_to(images.resolve()):
        raise FluencyError(f"--out {out} is inside --images {images}: its figures would be read as training images; "
                           "choose an --out outside the image folder")
    if out.exists() and not out.is_dir():
        raise FluencyError(f"--out {out}: a file, not a folder")
    taken = sorted(str(p.relative_to(out)) for pattern in TRAIN_OUTPUTS for p in out.glob(pattern))
    if taken and not overwrite:
        kind = "a training run (last.pt); use --resume to continue it," if "last.pt" in taken else \
            f"{', '.join(taken[:4])}{' …' if len(taken) > 4 else ''};"
        raise FluencyError(f"{out} already holds {kind} pass --overwrite to replace them, or choose another --out")


def train(config: TrainConfig | None = None, *, manager: PluginManager | None = None,
          console: Console | None = None, resume: bool = False, overwrite: bool = False,
          plugin_config: Mapping[str, Any] | None = None, files: Sequence[Path] | None = None,
          observer: TrainingObserver | None = None, replicate_label: str | None = None,
          **settings: Any) -> TrainResult:
    """Train from a :class:`TrainConfig` (or its fields as keyword arguments) and write ``out/final.pt``.

    ``plugin_config`` holds the plugin and loss tables of a ``--config`` file (its ``[train]``
    table is the :class:`TrainConfig` itself). ``files`` restricts training to some images of
    ``images`` (used for per-subgroup models). ``observer`` is told about each finished epoch;
    this function draws no figures itself (the CLI passes the figure observer when ``figures`` is on).
    Files already in ``out`` are replaced only with ``overwrite`` (or ``resume``). Every checkpoint records
    its replicate configuration: ``replicate_label`` (``--replicate-of``), else the id of its configuration.
    """
    cfg = config or TrainConfig(**settings)
    cfg.check()
    if replicate_label is not None:
        check_label(replicate_label)
    start = time.perf_counter()
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True)
    check_out(Path(cfg.out), Path(cfg.images), overwrite or resume)
    cfg, state = _start_or_resume(cfg, resume, console)
    options = _resolve_options(cfg, manager, plugin_config)
    run = _build(cfg, manager, options, files, console)
    history, first_epoch = _restore(run, state) if state is not None else ([], 1)
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out / "config.toml", toml_dumps({"train": asdict(with_absolute_paths(cfg))}))
    info = _checkpoint_info(run, options)
    label = replicate_label if replicate_label is not None or state is None else _resumed_label(state)
    info["replicate"] = replicate_record(run, info, label)
    configuration = info["replicate"]["configuration"]
    if run.optimizer is None:  # fitted in one pass
        history = _fit_once(run, console)
        _save(run, info, run.out / "final.pt", 1, history)
        return TrainResult(run.out / "final.pt", history, time.perf_counter() - start, configuration=configuration)
    history = _fit(run, info, history, first_epoch, console, observer)
    _save(run, info, run.out / "final.pt", cfg.epochs, history)
    warnings = training_warnings(run.out / "final.pt", info, run.out / "figures" / f"recon-epoch-{cfg.epochs:03d}.png")
    for item in warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(item['message'])}", highlight=False)
    return TrainResult(run.out / "final.pt", history, time.perf_counter() - start, warnings, configuration)


def _described(run: _Run, info: Mapping[str, Any]) -> dict[str, Any]:
    """``info`` as a loaded checkpoint of ``run`` shows it: plain types, with its architecture and training
    settings (what :func:`~fluency.core.model.replicates.replicate_of` reads from a saved checkpoint)."""
    return plain({**info, "architecture": {"name": run.cfg.architecture, "options": dict(run.model.options)},
                  "training": {"config": asdict(run.cfg)}})


def replicate_record(run: _Run, info: Mapping[str, Any], label: str | None) -> dict[str, str]:
    """``{"configuration": ...}`` for the checkpoints of ``run``: ``label``, else the id of its configuration,
    computed from the records as they are saved (so it equals the one computed from the checkpoint later)."""
    return {"configuration": label if label is not None else str(configuration_id(_described(run, info)))}


def _resumed_label(state: Mapping[str, Any]) -> str | None:
    """The configuration an interrupted run recorded (``--resume`` keeps it, a ``--replicate-of`` label too)."""
    saved = state.get("replicate")
    label = saved.get("configuration") if isinstance(saved, Mapping) else None
    return label if isinstance(label, str) and label else None


def planned_info(cfg: TrainConfig, *, manager: PluginManager | None = None,
                 plugin_config: Mapping[str, Any] | None = None, files: Sequence[Path] | None = None,
                 replicate_label: str | None = None) -> dict[str, Any]:
    """The description (no weights) a checkpoint of ``cfg`` would carry, its ``replicate`` record included,
    without training: builds the model and reads the images' fingerprint. How ``--seeds`` checks that a model
    it skips is of the configuration it trains."""
    manager = manager or get_plugin_manager()
    options = _resolve_options(cfg, manager, plugin_config)
    run = _build(cfg, manager, options, files, Console(quiet=True))
    info = _checkpoint_info(run, options)
    return {**_described(run, info), "replicate": replicate_record(run, info, replicate_label)}


def training_warnings(checkpoint: Path, info: Mapping[str, Any], figure: Path) -> list[dict[str, str]]:
    """The warnings about a trained model from its checkpoint's records: a collapsed latent (pointing to the
    last reconstruction grid when it was drawn), constraints whose target was not reached."""
    shown = str(figure) if figure.exists() else None
    collapsed = collapse_warning(str(checkpoint), info.get("latent"), shown)
    return [*([collapsed] if collapsed else []),
            *sparsity_warnings(str(checkpoint), info.get("sparsity"), "the validation images")]


def _start_or_resume(cfg: TrainConfig, resume: bool,
                     console: Console) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config to train with and the checkpoint to resume from (None for a fresh run).

    On ``--resume`` the interrupted run's :data:`RESUMED_SETTINGS` win (in a copy; ``cfg`` is left as is).
    """
    last = Path(cfg.out) / "last.pt"
    if not resume:
        return cfg, None
    if not last.exists():
        raise FluencyError(f"--resume: {last} does not exist; nothing to resume")
    state = read_checkpoint(last)
    check_training_state(last, state)
    saved = state["training"]["config"]
    changed = {k: saved[k] for k in RESUMED_SETTINGS if k in saved and saved[k] != getattr(cfg, k)}
    try:
        resumed = replace(cfg, **changed)
        resumed.check()
    except (FluencyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"--resume: checkpoint {last} holds invalid training settings: {exc}") from None
    for key, value in changed.items():
        console.print(f"[yellow]--resume:[/yellow] using the interrupted run's {key} = {value!r}")
    return resumed, state


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``images``, ``out`` and every ``-o`` value naming an existing file made absolute, so the saved
    ``config.toml`` trains the same model from any folder."""
    def absolute(assignment: str) -> str:
        key, sep, value = assignment.partition("=")
        return f"{key}={Path(value).resolve()}" if sep and value and Path(value).is_file() else assignment

    return replace(cfg, images=str(Path(cfg.images).resolve()), out=str(Path(cfg.out).resolve()),
                   options=[absolute(o) for o in cfg.options])


def _resolve_options(cfg: TrainConfig, manager: PluginManager, plugin_config: Mapping[str, Any] | None) -> _Options:
    """Plugin options from the config tables and ``-o``; loss options from ``[NAME]``/``[loss.NAME]`` and ``-o``."""
    constraint_names = list(dict.fromkeys(cfg.constraints))
    used = [("architecture", cfg.architecture), ("optimizer", cfg.optimizer),
            *(("constraint", c) for c in constraint_names)]
    tables = dict(plugin_config or {})
    loss_config = {**{k: v for k, v in tables.items() if k in LOSSES}, **dict(tables.get("loss", {}))}
    resolved = resolve_plugin_options(manager, used, _plugin_assignments(cfg.options), tables,
                                      ignore_tables=("train", "loss", *LOSSES))
    loss_terms = [{"name": n, "weight": w, "options": {**dict(loss_config.get(n, {})), **_loss_options(n, cfg.options)}}
                  for n, w in parse_loss_terms(cfg.losses)]
    optimizer = dict(resolved[("optimizer", cfg.optimizer)])
    if cfg.lr is not None:
        if "lr" not in manager.get("optimizer", cfg.optimizer).options:
            raise OptionError(f"--lr: optimizer {cfg.optimizer!r} has no lr option")
        optimizer["lr"] = float(cfg.lr)
    size = manager.get("architecture", cfg.architecture).options.get("image_size")  # its bounds hold for --image-size
    image_size = cfg.image_size if size is None else size.validate(cfg.image_size,
                                                                   f"train: image_size ({cfg.architecture})")
    return _Options(loss_terms=loss_terms,
                    architecture={**resolved[("architecture", cfg.architecture)], "image_size": image_size},
                    optimizer=optimizer, constraints={n: resolved[("constraint", n)] for n in constraint_names})


def _build(cfg: TrainConfig, manager: PluginManager, options: _Options, files: Sequence[Path] | None,
           console: Console) -> _Run:
    """Model, losses, constraints, data split, optimizer and scheduler, in a fixed order (the seeded RNG's draws)."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = Precision.build(cfg.amp, device)
    model = manager.get("architecture", cfg.architecture).load()(**options.architecture).to(device)
    one_pass = bool(getattr(model, "fitted_in_one_pass", False))
    if not one_pass and "objective" not in getattr(model, "provides", ()):
        raise TrainingError(f"architecture {cfg.architecture!r} ({getattr(model, 'kind', '') or 'no kind'}) has no "
                            "training objective: it is used as it is (fluency run --model ...), not trained")
    inapplicable = [flag for flag, given in (("--constraint", options.constraints), ("--lr", cfg.lr is not None),
                                             ("--amp", cfg.amp != "off")) if given]
    if one_pass and inapplicable:
        raise OptionError(f"architecture {cfg.architecture!r} is fitted in one pass, not by gradient steps: "
                          f"{inapplicable[0]} does not apply to it")
    recon_loss = ReconstructionLoss(options.loss_terms).to(device) if "decoder" in model.provides else None
    constraints = {name: manager.get("constraint", name).load()(**opts) for name, opts in options.constraints.items()}
    capture = list(dict.fromkeys(layer for c in constraints.values() for layer in c.layers(model)))
    root = Path(cfg.images)
    paths = sorted(files) if files is not None else find_images(root)
    for path, why in (scan_images(root)[1] if files is None else {}).items():  # a pipe…: left out, unopened
        console.print(f"[yellow]warning:[/yellow] {escape(str(path))}: {why}", highlight=False)
    source = FolderSource(root, {p.relative_to(root).with_suffix("").as_posix(): p for p in paths},
                          Preprocessing(cfg.image_size, model.input_shape[0], cfg.resize))
    train_idx, val_idx = split_indices(len(source), cfg.val_fraction, cfg.seed)
    optimizer = None if one_pass else _build_optimizer(manager, cfg.optimizer, options.optimizer, model)
    check_amp_optimizer(cfg.amp, cfg.optimizer, optimizer)
    scheduler = None if one_pass else _scheduler(optimizer, cfg, math.ceil(len(train_idx) / cfg.batch_size))
    return _Run(cfg=cfg, out=Path(cfg.out), device=device, model=model, recon_loss=recon_loss,
                loss_terms=options.loss_terms, constraints=constraints, capture=capture, source=source,
                train_idx=train_idx, val_idx=val_idx, optimizer=optimizer, scheduler=scheduler,
                workers=worker_count(cfg.workers, device.type), precision=precision)


def _build_optimizer(manager: PluginManager, name: str, options: dict[str, Any], model: torch.nn.Module) -> Any:
    """The optimizer over the trainable parameters only: frozen ones (e.g. ``freeze_encoder``) are not handed to
    it, so no optimizer (weight decay, momentum, a plugin's own rule) can move them or keep state for them."""
    factory = manager.get("optimizer", name).load()
    params = inspect.signature(factory).parameters
    extra = {"model": model} if "model" in params else {}  # SAM protects BatchNorm statistics with it
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(f"optimizer {name!r}: the model has no trainable parameters (all are frozen)")
    return factory(trainable, **options, **extra)


def _scheduler(optimizer: Any, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    if cfg.schedule == "none":
        return None
    return build_scheduler(optimizer, cfg.schedule, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                           step_size=cfg.schedule_step_size, gamma=cfg.schedule_gamma,
                           warmup_epochs=cfg.warmup_epochs)


def _restore(run: _Run, state: Mapping[str, Any]) -> tuple[list[dict[str, float]], int]:
    """Load weights, optimizer, scheduler and RNG state from ``last.pt``; its history and the next epoch."""
    try:
        run.model.load_state_dict(state["state_dict"])
        run.optimizer.load_state_dict(state["training"]["optimizer_state"])
        if run.scheduler is not None and state["training"].get("scheduler_state"):
            run.scheduler.load_state_dict(state["training"]["scheduler_state"])
        torch.set_rng_state(state["training"]["rng_state"])
        if run.precision.scaler is not None and state["training"].get("scaler_state"):
            run.precision.scaler.load_state_dict(state["training"]["scaler_state"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"--resume: checkpoint {run.out / 'last.pt'} does not fit this training run "
                              f"({error_text(exc)})") from None
    return list(state.get("history", [])), int(state["epoch"]) + 1


def _checkpoint_info(run: _Run, options: _Options) -> dict[str, Any]:
    """What every checkpoint of the run records besides weights and training state (loss, data, provenance)."""
    cfg, source = run.cfg, run.source
    trained = {} if run.optimizer is None else {  # a model fitted in one pass has no loss, optimizer, constraints
        "loss": {"terms": run.loss_terms, "beta": cfg.beta, "beta_warmup": cfg.beta_warmup},
        "optimizer": {"name": cfg.optimizer, "options": options.optimizer},
        "constraints": [{"name": n, "options": options.constraints[n]} for n in run.constraints]}
    return {
        **trained,
        "data": {"images": str(Path(cfg.images).resolve()), "n_images": len(source), "n_train": len(run.train_idx),
                 "n_val": len(run.val_idx), "fingerprint": source.fingerprint(),
                 "preprocessing": source.preprocessing.as_dict()},
        "provenance": {"fluency_version": __version__, "torch_version": str(torch.__version__), "seed": cfg.seed,
                       "device": str(run.device), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def _save(run: _Run, info: Mapping[str, Any], path: Path, epoch: int, history: Sequence[Mapping[str, float]]) -> None:
    """A checkpoint with the optimizer, scheduler and RNG states ``--resume`` needs to continue exactly."""
    scaler = run.precision.scaler
    training_state = {"config": asdict(run.cfg), "rng_state": torch.get_rng_state(),
                      "scheduler_state": run.scheduler.state_dict() if run.scheduler is not None else None,
                      **({"optimizer_state": run.optimizer.state_dict()} if run.optimizer is not None else {}),
                      **({"scaler_state": scaler.state_dict()} if scaler is not None else {})}
    save_checkpoint(path, run.model, run.cfg.architecture, epoch=epoch, history=list(history),
                    training=training_state, **info)


def _fit(run: _Run, info: dict[str, Any], history: Sequence[dict[str, float]], first_epoch: int,
         console: Console, observer: TrainingObserver | None) -> list[dict[str, float]]:
    """Epochs ``first_epoch``..``epochs``: train, validate, save; the history including the earlier epochs."""
    cfg, history = run.cfg, list(history)
    order = Order(len(run.train_idx))
    train_loader = image_loader(run.source, run.train_idx, cfg.batch_size, run.workers, run.device, order)
    val_loader = image_loader(run.source, run.val_idx, cfg.batch_size, run.workers, run.device)
    with progress_bar(console) as progress:
        task = progress.add_task("training", total=(cfg.epochs - first_epoch + 1) * run.steps_per_epoch, status="")
        for epoch in range(first_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            beta = beta_at(epoch, cfg.beta, cfg.beta_warmup)
            order.order = epoch_order(len(run.train_idx), cfg.seed * 100_003 + epoch)
            means = _train_epoch(run, epoch, beta, batches(train_loader, run.device),
                                 lambda status: progress.update(task, advance=1, status=status))
            history.append({"epoch": epoch, "beta": beta, **means, **_validate(run, val_loader, beta),
                            "seconds": time.perf_counter() - t0})
            info.update(_health(run, val_loader, history, beta))  # this epoch's weights: every save below
            _end_epoch(run, info, history, epoch, observer)
    return history


def _fit_once(run: _Run, console: Console) -> list[dict[str, float]]:
    """Fit a model that is fitted in one pass (``fitted_in_one_pass``): its ``fit`` reads the training images
    once, in order, with the validation images held out; its numbers are the history's one row (epoch 1)."""
    cfg, t0 = run.cfg, time.perf_counter()
    train_loader = image_loader(run.source, run.train_idx, cfg.batch_size, run.workers, run.device)
    val_loader = image_loader(run.source, run.val_idx, cfg.batch_size, run.workers, run.device)
    with progress_bar(console) as progress, torch.no_grad():
        task = progress.add_task("fitting", total=len(train_loader), status="reading the training images")

        def training_batches() -> Iterator[torch.Tensor]:
            for batch in fresh_pass(train_loader, run.device):
                yield batch
                progress.update(task, advance=1)

        summary = run.model.fit(training_batches(), fresh_pass(val_loader, run.device), cfg.seed,
                                lambda text: progress.update(task, status=text))
    history = [{"epoch": 1, **{k: float(v) for k, v in summary.items()}, "seconds": time.perf_counter() - t0}]
    _check_finite(history[0], 1, run.out)
    with atomic_path(run.out / "history.parquet") as tmp:
        pd.DataFrame(history).to_parquet(tmp, index=False)
    return history


def _train_epoch(run: _Run, epoch: int, beta: float, batches: Iterator[torch.Tensor],
                 advance: Callable[[str], None]) -> dict[str, float]:
    """One pass over the training ``batches`` (shuffled with a per-epoch seed): the final lr and each term's
    mean."""
    cfg = run.cfg
    run.model.train()
    sums: dict[str, float] = {}
    for batch in batches:
        logged = _train_step(run, batch, beta)
        _check_finite(logged, epoch, run.out)
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v * len(batch)
        live = " ".join(f"{k} {v:.3g}" for k, v in logged.items() if k != "loss")
        advance(f"epoch {epoch}/{cfg.epochs} loss {logged['loss']:.4g} ({live})")
    return {"lr": float(run.optimizer.param_groups[0]["lr"]), **{k: v / len(run.train_idx) for k, v in sums.items()}}


def _train_step(run: _Run, batch: torch.Tensor, beta: float) -> dict[str, float]:
    """One optimizer step (through a closure, so SAM can take its two passes; with ``--amp fp16`` through the
    gradient scaler, which skips a step whose gradients overflowed), then one scheduler step."""
    logged: dict[str, float] = {}
    scaler = run.precision.scaler

    def closure() -> torch.Tensor:
        run.optimizer.zero_grad(set_to_none=True)
        terms = _loss_terms(run, batch, beta)
        (terms["loss"] if scaler is None else scaler.scale(terms["loss"])).backward()
        if not logged:  # SAM calls the closure twice: log the first (unperturbed) pass
            logged.update(_as_floats(terms))
        return terms["loss"]

    if scaler is None:
        run.optimizer.step(closure)
    else:
        closure()
        scaler.step(run.optimizer)
        scaler.update()
    if run.scheduler is not None:
        run.scheduler.step()
    return logged


def _as_floats(terms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The (one-element) terms as Python floats, copied off the device together: one synchronisation per
    step rather than one per term. Stacked in their widest type, so each value is exactly ``float(term)``."""
    values = [v.detach().reshape(()) for v in terms.values()]
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
    device = terms["loss"].device
    return dict(zip(terms, torch.stack([v.to(device, dtype) for v in values]).tolist()))


def _loss_terms(run: _Run, batch: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The batch means of the architecture's objective terms (for a VAE recon, kl and per-loss recon_*),
    then each constraint's penalty, and their total, ``loss``. With ``--amp`` the forward pass runs under
    autocast and the terms are computed in float32 from its outputs."""
    settings = ObjectiveSettings(run.recon_loss.components if run.recon_loss is not None else None,
                                 {t["name"]: float(t["weight"]) for t in run.loss_terms}, beta)
    with _captured(run) as acts, run.precision.autocast():
        output = run.model(batch)
    if run.precision.reduced:
        output, acts = to_float32(output), to_float32(acts)
    terms = {k: v.mean() for k, v in run.model.objective(output, batch, settings).items()}
    total = terms.pop("loss")
    for name, constraint in run.constraints.items():
        terms[name] = constraint(acts, run.model)
        total = total + terms[name]
    terms.update(_mean_activations(run, acts))
    terms["loss"] = total
    return terms


def _captured(run: _Run) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
    """The activations of the constrained layers during a forward pass; no hooks at all without constraints."""
    if not run.capture:
        return contextlib.nullcontext({})
    return capture_activations(run.model, run.capture, detach=False)


def _mean_activations(run: _Run, acts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``mean_act[LAYER]`` of every constrained layer, as its (first) constraint measures it (logged only)."""
    out: dict[str, torch.Tensor] = {}
    for constraint in run.constraints.values():
        for layer in constraint.layers(run.model):
            if f"mean_act[{layer}]" not in out and layer in acts:
                out[f"mean_act[{layer}]"] = torch.tensor(constraint.mean_activation(acts[layer]))
    return out


@torch.no_grad()
def fit_records(model: Any, batches: Iterator[torch.Tensor], settings: ObjectiveSettings,
                loss: str) -> dict[str, Any]:
    """``fit`` (per-image reconstruction error, ``loss`` its name) and ``latent`` (KL per dimension) of a model
    with a decoder over ``batches`` (eval mode, z = μ, as ``fluency run`` measures stimuli); {} for other kinds
    or no images."""
    if "decoder" not in getattr(model, "provides", ()):
        return {}
    was_training = model.training
    model.eval()
    errors, latent = ErrorSummary(), LatentActivity()
    for batch in batches:
        output = model(batch, sample=False)
        errors.add(model.objective(output, batch, settings)["recon"])
        if isinstance(output, VAEOutput):
            latent.add(output.mu, output.logvar)
    model.train(was_training)
    records = {"fit": errors.record(loss), "latent": latent.record()}
    return {k: {"split": "validation", "z": "mu", **v} for k, v in records.items() if v is not None}


def _health(run: _Run, loader: Any, history: Sequence[Mapping[str, float]], beta: float) -> dict[str, Any]:
    """What the checkpoint of this epoch records for ``fluency run``'s checks: ``fit`` and ``latent`` on the
    validation images, ``sparsity`` from the epoch's (validation, else training) mean activations."""
    settings = ObjectiveSettings(run.recon_loss.components if run.recon_loss is not None else None,
                                 {t["name"]: float(t["weight"]) for t in run.loss_terms}, beta)
    health = fit_records(run.model, fresh_pass(loader, run.device), settings, loss_name(run.loss_terms))
    last, sparsity = history[-1], []
    for name, constraint in run.constraints.items():
        for layer in constraint.layers(run.model):
            reached = last.get(f"val_mean_act[{layer}]", last.get(f"mean_act[{layer}]"))
            sparsity.append({"constraint": name, "layer": layer, "target": constraint.target, "reached": reached,
                             "measure": constraint.activity})
    return {**health, **({"sparsity": sparsity} if sparsity else {})}


def _check_finite(logged: Mapping[str, float], epoch: int, out: Path) -> None:
    """Stop with a :class:`TrainingError` on a NaN or infinite term (``last.pt`` keeps the last good epoch)."""
    bad = [k for k, v in logged.items() if not math.isfinite(v)]
    if bad:
        kept = f"; {out / 'last.pt'} keeps epoch {epoch - 1}" if epoch > 1 else ""
        raise TrainingError(f"epoch {epoch}: the loss became non-finite ({', '.join(bad)} = "
                            f"{logged[bad[0]]}); training stopped{kept}. Lower the learning rate "
                            f"(--lr), beta or the constraint weights.")


@torch.no_grad()
def _validate(run: _Run, loader: Any, beta: float) -> dict[str, float]:
    """Mean loss terms on the validation images (eval mode), as ``val_<term>``."""
    if len(loader.dataset) == 0:
        return {}
    run.model.eval()
    sums: dict[str, float] = {}
    for batch in fresh_pass(loader, run.device):
        for k, v in _as_floats(_loss_terms(run, batch, beta)).items():
            sums[k] = sums.get(k, 0.0) + v * len(batch)
    run.model.train()
    return {f"val_{k}": v / len(loader.dataset) for k, v in sums.items()}


def _end_epoch(run: _Run, info: Mapping[str, Any], history: Sequence[Mapping[str, float]], epoch: int,
               observer: TrainingObserver | None) -> None:
    """Write ``last.pt`` (and ``epoch-NNN.pt`` when due) and ``history.parquet``, then tell the observer."""
    _save(run, info, run.out / "last.pt", epoch, history)
    if run.cfg.checkpoint_every and epoch % run.cfg.checkpoint_every == 0:
        _save(run, info, run.out / f"epoch-{epoch:03d}.pt", epoch, history)
    with atomic_path(run.out / "history.parquet") as tmp:
        pd.DataFrame(list(history)).to_parquet(tmp, index=False)
    if observer is not None:
        observer.epoch_end(EpochEnd(epoch=epoch, history=tuple(history), model=run.model, source=run.source,
                                    val_indices=tuple(run.val_idx), out=run.out, device=run.device))




def _label(values: Sequence[Any], columns: Sequence[str]) -> str:
    text = "_".join(f"{c}={v}" for c, v in zip(columns, values))
    return "".join(ch if ch.isalnum() or ch in "=_-." else "-" for ch in text)


def train_by_group(cfg: TrainConfig, ratings: str | Path, id_column: str, by: Sequence[str], min_size: int,
                   console: Console | None = None, manager: PluginManager | None = None,
                   plugin_config: Mapping[str, Any] | None = None,
                   observer: TrainingObserver | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train one model per subgroup (rows sharing the values of ``by``) of a ratings table.

    Each model goes to ``out/<col=value_...>/final.pt``; ``out/checkpoints.json`` lists the set
    (label, group values, size, checkpoint). Groups smaller than ``min_size`` are refused and
    reported; if every group is refused, nothing is trained and the error says so. ``observer``
    is passed to :func:`train` for every group.
    """
    from fluency.core.inputs.ratings import match_ids, read_table
    from fluency.core.atomic import atomic_write_json

    console = console or Console(stderr=True)
    check_out(Path(cfg.out), Path(cfg.images), overwrite)
    table = read_table(ratings)
    missing = [c for c in [id_column, *by] if c not in table.columns]
    if missing:
        raise FluencyError(f"{ratings}: no column(s) {missing}; columns are {list(table.columns)}")
    root = Path(cfg.images)
    report = match_ids(list(table[id_column].astype(str).str.strip()), root, find_images(root))
    groups, trained = [], 0
    for values, rows in table.groupby(list(by), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        ids = [str(i).strip() for i in rows[id_column] if str(i).strip() in report.matched]
        label = _label(values, by)
        entry: dict[str, Any] = {"label": label, "group": dict(zip(by, [str(v) for v in values])),
                                 "n_rows": len(rows), "n_images": len(ids)}
        if len(ids) < min_size:
            entry["refused"] = f"{len(ids)} images, fewer than --min-group-size {min_size}"
            console.print(f"[yellow]group {label}:[/yellow] {entry['refused']}; not trained")
        else:
            console.print(f"group {label}: {len(ids)} images")
            sub = TrainConfig(**{**asdict(cfg), "out": str(Path(cfg.out) / label)})
            result = train(sub, manager=manager, console=console, plugin_config=plugin_config, overwrite=overwrite,
                           files=[Path(report.matched[i]) for i in ids], observer=observer)
            entry["checkpoint"] = str(result.checkpoint)
            trained += 1
        groups.append(entry)
    if not trained:
        sizes = ", ".join(f"{g['label']} ({g['n_images']})" for g in groups)
        raise FluencyError(f"--by {','.join(by)}: every subgroup is smaller than --min-group-size {min_size}: {sizes}")
    summary = {"by": list(by), "ratings": str(Path(ratings).resolve()), "min_group_size": min_size, "groups": groups,
               "unmatched_ids": report.missing_images}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cfg.out) / "checkpoints.json", summary)
    return summary



def _plugin_assignments(options: Sequence[str]) -> list[str]:
    """The ``-o`` assignments meant for plugins (those for reconstruction losses are handled apart)."""
    out = []
    for text in options:
        target = text.partition("=")[0].split(".")
        if target[0] == "loss" or (len(target) == 2 and target[0] in LOSSES):
            continue
        out.append(text)
    return out


def _loss_options(name: str, options: Sequence[str]) -> dict[str, Any]:
    """``-o NAME.KEY=VALUE`` or ``-o loss.NAME.KEY=VALUE`` for the reconstruction loss ``name``."""
    from fluency.core.plugin.options import parse_value

    found: dict[str, Any] = {}
    for text in options:
        target, _, raw = text.partition("=")
        parts = target.strip().split(".")
        if parts[0] == "loss":
            parts = parts[1:]
        if len(parts) == 2 and parts[0] == name:
            found[parts[1]] = parse_value(raw.strip())
    return found
