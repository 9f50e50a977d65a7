"""``fluency train``: fit an Architecture plugin's VAE to a folder of images.

Per image, the loss is Σ_k w_k·recon_k (see :mod:`fluency.core.recon_losses`) +
β(epoch)·KL + Σ_c θ_c·constraint_c, where β rises linearly from 0 over
``beta_warmup`` epochs. The optimizer (a plugin) is always stepped with a closure,
so SAM's two passes work; BatchNorm statistics are protected by the optimizer.

Everything lands in ``out/``:

- ``last.pt`` after every epoch (what ``--resume`` continues from), ``epoch-NNN.pt``
  every ``checkpoint_every`` epochs and ``final.pt`` at the end: one self-describing
  file each (:mod:`fluency.core.checkpoint`), with the RNG, optimizer and scheduler
  states needed to resume exactly;
- ``history.parquet``: one row per epoch (train and validation loss terms, lr, time);
- ``config.toml``: the resolved configuration (``fluency train --config out/config.toml``
  repeats the run);
- ``figures/curves.png`` and ``figures/recon-epoch-NNN.png`` (validation images above
  their reconstructions).

A NaN or infinite loss stops training with a message; ``last.pt`` keeps the last
good epoch.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from fluency import __version__
from fluency.core.atomic import atomic_path, atomic_write_text
from fluency.core.capture import capture_activations
from fluency.core.checkpoint import read_checkpoint, save_checkpoint
from fluency.core.config import resolve_plugin_options
from fluency.core.devices import resolve_device
from fluency.core.errors import FluencyError, OptionError, TrainingError
from fluency.core.images import RESIZE, FolderSource, Preprocessing, find_images
from fluency.core.losses import kl_divergence
from fluency.core.plugins import PluginManager, get_plugin_manager
from fluency.core.progress import progress_bar
from fluency.core.recon_losses import LOSSES, ReconstructionLoss, parse_loss_terms


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
        parse_loss_terms(self.losses)


@dataclass
class TrainResult:
    """Where the final checkpoint went and how the loss evolved."""

    checkpoint: Path
    history: list[dict[str, float]]
    seconds: float


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


class _Subset(torch.utils.data.Dataset):
    def __init__(self, source: FolderSource, indices: Sequence[int]) -> None:
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source.load(self.indices[i])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split; at least one validation image when the fraction is positive."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = 0 if val_fraction <= 0 or n < 2 else max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def beta_at(epoch: int, beta: float, warmup: int) -> float:
    """β for 1-based ``epoch``: linear from β/warmup to β over the warm-up epochs, then β."""
    return beta if warmup <= 0 else beta * min(1.0, epoch / warmup)


def _build_optimizer(manager: PluginManager, name: str, options: dict[str, Any], model: torch.nn.Module) -> Any:
    factory = manager.get("optimizer", name).load()
    params = inspect.signature(factory).parameters
    extra = {"model": model} if "model" in params else {}  # SAM protects BatchNorm statistics with it
    return factory(model.parameters(), **options, **extra)


def _scheduler(optimizer: Any, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    if cfg.schedule == "none":
        return None
    from fluency.core.schedules import build_scheduler

    return build_scheduler(optimizer, cfg.schedule, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                           step_size=cfg.schedule_step_size, gamma=cfg.schedule_gamma,
                           warmup_epochs=cfg.warmup_epochs)


def train(config: TrainConfig | None = None, *, manager: PluginManager | None = None,
          console: Console | None = None, resume: bool = False, plugin_config: Mapping[str, Any] | None = None,
          files: Sequence[Path] | None = None, **settings: Any) -> TrainResult:
    """Train from a :class:`TrainConfig` (or its fields as keyword arguments) and write ``out/final.pt``.

    ``plugin_config`` holds the plugin and loss tables of a ``--config`` file (its ``[train]``
    table is the :class:`TrainConfig` itself). ``files`` restricts training to some images of
    ``images`` (used for per-subgroup models).
    """
    cfg = config or TrainConfig(**settings)
    cfg.check()
    start = time.perf_counter()
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    state: dict[str, Any] | None = None
    if resume:
        if not (out / "last.pt").exists():
            raise FluencyError(f"--resume: {out / 'last.pt'} does not exist; nothing to resume")
        state = read_checkpoint(out / "last.pt")
        saved = dict(state.get("training", {}).get("config", {}))
        for key in ("architecture", "optimizer", "losses", "constraints", "image_size", "resize", "batch_size",
                    "seed", "val_fraction", "beta", "beta_warmup", "schedule", "schedule_step_size",
                    "schedule_gamma", "warmup_epochs", "options", "lr"):
            if key in saved and saved[key] != getattr(cfg, key):
                console.print(f"[yellow]--resume:[/yellow] using the interrupted run's {key} = {saved[key]!r}")
                setattr(cfg, key, saved[key])
    elif (out / "last.pt").exists():
        raise FluencyError(f"{out} already holds a training run (last.pt); use --resume to continue it or "
                           "choose another --out")

    loss_terms = [{"name": n, "weight": w, "options": {}} for n, w in parse_loss_terms(cfg.losses)]
    used = [("architecture", cfg.architecture), ("optimizer", cfg.optimizer)]
    used += [("constraint", c) for c in dict.fromkeys(cfg.constraints)]
    tables = dict(plugin_config or {})
    loss_config = {**{k: v for k, v in tables.items() if k in LOSSES}, **dict(tables.get("loss", {}))}
    resolved = resolve_plugin_options(manager, used, _plugin_assignments(cfg.options), tables,
                                      ignore_tables=("train", "loss", *LOSSES))
    for term in loss_terms:  # [lpips] / [loss.lpips] tables, then -o lpips.net=vgg / -o loss.lpips.net=vgg
        term["options"] = {**dict(loss_config.get(term["name"], {})), **_loss_options(term["name"], cfg.options)}
    arch_options = {**resolved[("architecture", cfg.architecture)], "image_size": cfg.image_size}
    opt_options = dict(resolved[("optimizer", cfg.optimizer)])
    if cfg.lr is not None:
        if "lr" not in manager.get("optimizer", cfg.optimizer).options:
            raise OptionError(f"--lr: optimizer {cfg.optimizer!r} has no lr option")
        opt_options["lr"] = float(cfg.lr)

    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    model = manager.get("architecture", cfg.architecture).load()(**arch_options).to(dev)
    recon_loss = ReconstructionLoss(loss_terms).to(dev)
    constraints = {name: manager.get("constraint", name).load()(**resolved[("constraint", name)])
                   for name in dict.fromkeys(cfg.constraints)}
    capture = list(dict.fromkeys(layer for c in constraints.values() for layer in c.layers(model)))

    root = Path(cfg.images)
    files = sorted(files) if files is not None else find_images(root)
    source = FolderSource(root, {p.relative_to(root).with_suffix("").as_posix(): p for p in files},
                          Preprocessing(cfg.image_size, model.input_shape[0], cfg.resize))
    train_idx, val_idx = split_indices(len(source), cfg.val_fraction, cfg.seed)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    optimizer = _build_optimizer(manager, cfg.optimizer, opt_options, model)
    scheduler = _scheduler(optimizer, cfg, steps_per_epoch)
    history: list[dict[str, float]] = []
    first_epoch = 1
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["training"]["optimizer_state"])
        if scheduler is not None and state["training"].get("scheduler_state"):
            scheduler.load_state_dict(state["training"]["scheduler_state"])
        torch.set_rng_state(state["training"]["rng_state"])
        history = list(state.get("history", []))
        first_epoch = int(state["epoch"]) + 1
    out.mkdir(parents=True, exist_ok=True)
    settings_dict = {k: v for k, v in asdict(cfg).items()}
    atomic_write_text(out / "config.toml", toml_dumps({"train": settings_dict}))
    info: dict[str, Any] = {
        "loss": {"terms": loss_terms, "beta": cfg.beta, "beta_warmup": cfg.beta_warmup},
        "optimizer": {"name": cfg.optimizer, "options": opt_options},
        "constraints": [{"name": n, "options": resolved[("constraint", n)]} for n in constraints],
        "data": {"images": str(root.resolve()), "n_images": len(source), "n_train": len(train_idx),
                 "n_val": len(val_idx), "fingerprint": source.fingerprint(),
                 "preprocessing": source.preprocessing.as_dict()},
        "provenance": {"fluency_version": __version__, "torch_version": str(torch.__version__), "seed": cfg.seed,
                       "device": str(dev), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }

    def save(path: Path, epoch: int) -> None:
        training_state = {"config": settings_dict, "optimizer_state": optimizer.state_dict(),
                          "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
                          "rng_state": torch.get_rng_state()}
        save_checkpoint(path, model, cfg.architecture, epoch=epoch, history=history, training=training_state,
                        **info)

    def step_terms(batch: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        with capture_activations(model, capture, detach=False) as acts:
            output = model(batch)
        recon_parts = recon_loss.components(output.recon, batch)
        recon = sum(float(t["weight"]) * recon_parts[t["name"]] for t in loss_terms).mean()
        kl = kl_divergence(output.mu, output.logvar).mean()
        terms = {"recon": recon, "kl": kl}
        terms.update({f"recon_{k}": v.mean() for k, v in recon_parts.items()} if len(recon_parts) > 1 else {})
        total = recon + beta * kl
        for name, constraint in constraints.items():
            terms[name] = constraint(acts, model)
            total = total + terms[name]
        terms["loss"] = total
        return terms

    val_loader = torch.utils.data.DataLoader(_Subset(source, val_idx), batch_size=cfg.batch_size)
    with progress_bar(console) as progress:
        task = progress.add_task("training", total=(cfg.epochs - first_epoch + 1) * steps_per_epoch, status="")
        for epoch in range(first_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            beta = beta_at(epoch, cfg.beta, cfg.beta_warmup)
            model.train()
            loader = torch.utils.data.DataLoader(_Subset(source, train_idx), batch_size=cfg.batch_size, shuffle=True,
                                                 generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            sums: dict[str, float] = {}
            for batch in loader:
                batch = batch.to(dev)
                logged: dict[str, float] = {}

                def closure() -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    terms = step_terms(batch, beta)
                    terms["loss"].backward()
                    if not logged:  # SAM calls the closure twice: log the first (unperturbed) pass
                        logged.update({k: float(v.detach()) for k, v in terms.items()})
                    return terms["loss"]

                optimizer.step(closure)
                if scheduler is not None:
                    scheduler.step()
                bad = [k for k, v in logged.items() if not math.isfinite(v)]
                if bad:
                    kept = f"; {out / 'last.pt'} keeps epoch {epoch - 1}" if epoch > 1 else ""
                    raise TrainingError(f"epoch {epoch}: the loss became non-finite ({', '.join(bad)} = "
                                        f"{logged[bad[0]]}); training stopped{kept}. Lower the learning rate "
                                        f"(--lr), beta or the constraint weights.")
                for k, v in logged.items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch)
                live = " ".join(f"{k} {v:.3g}" for k, v in logged.items() if k != "loss")
                progress.update(task, advance=1, status=f"epoch {epoch}/{cfg.epochs} loss {logged['loss']:.4g} "
                                                        f"({live})")
            row: dict[str, float] = {"epoch": epoch, "beta": beta, "lr": float(optimizer.param_groups[0]["lr"]),
                                     **{k: v / len(train_idx) for k, v in sums.items()}}
            row.update(_validate(model, val_loader, step_terms, beta, dev))
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            save(out / "last.pt", epoch)
            if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
                save(out / f"epoch-{epoch:03d}.pt", epoch)
            with atomic_path(out / "history.parquet") as tmp:
                pd.DataFrame(history).to_parquet(tmp, index=False)
            if cfg.figures:
                from fluency.core import figures

                figures.training_curves(history, out / "figures" / "curves.png")
                if val_idx:
                    figures.reconstruction_grid(model, source, val_idx[:8], out / "figures" /
                                                f"recon-epoch-{epoch:03d}.png", dev)
    save(out / "final.pt", cfg.epochs)
    return TrainResult(out / "final.pt", history, time.perf_counter() - start)


def _label(values: Sequence[Any], columns: Sequence[str]) -> str:
    text = "_".join(f"{c}={v}" for c, v in zip(columns, values))
    return "".join(ch if ch.isalnum() or ch in "=_-." else "-" for ch in text)


def train_by_group(cfg: TrainConfig, ratings: str | Path, id_column: str, by: Sequence[str], min_size: int,
                   console: Console | None = None, manager: PluginManager | None = None,
                   plugin_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train one model per subgroup (rows sharing the values of ``by``) of a ratings table.

    Each model goes to ``out/<col=value_...>/final.pt``; ``out/checkpoints.json`` lists the set
    (label, group values, size, checkpoint). Groups smaller than ``min_size`` are refused and
    reported; if every group is refused, nothing is trained and the error says so.
    """
    from fluency.core.ratings import match_ids, read_table
    from fluency.core.atomic import atomic_write_json

    console = console or Console(stderr=True)
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
            result = train(sub, manager=manager, console=console, plugin_config=plugin_config,
                           files=[Path(report.matched[i]) for i in ids])
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


@torch.no_grad()
def _validate(model: torch.nn.Module, loader: Any, step_terms: Any, beta: float, dev: torch.device) -> dict[str, float]:
    """Mean loss terms on the validation images (eval mode), as ``val_<term>``."""
    if len(loader.dataset) == 0:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    for batch in loader:
        batch = batch.to(dev)
        for k, v in step_terms(batch, beta).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
    model.train()
    return {f"val_{k}": v / len(loader.dataset) for k, v in sums.items()}


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
    from fluency.core.options import parse_value

    found: dict[str, Any] = {}
    for text in options:
        target, _, raw = text.partition("=")
        parts = target.strip().split(".")
        if parts[0] == "loss":
            parts = parts[1:]
        if len(parts) == 2 and parts[0] == name:
            found[parts[1]] = parse_value(raw.strip())
    return found
