"""``fluency train --seeds 1-10``: replicate models, one per seed of the same configuration.

Each seed trains a normal training run into ``OUT/seed-<k>/`` (``final.pt``, history, figures), one after
the other, each with its own progress bar; ``OUT/replicates.json`` lists them with their configuration
(:mod:`fluency.core.model.replicates`). The same command continues a killed training: a seed whose
``final.pt`` exists is skipped with a note (after checking it is of this configuration), and with
``--resume`` the interrupted seed continues from its ``last.pt``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fluency.core.atomic import atomic_write_json
from fluency.core.errors import FluencyError
from fluency.core.model.checkpoint import read_checkpoint
from fluency.core.model.replicates import differences, replicate_of
from fluency.core.plugin.manager import PluginManager, get_plugin_manager
from fluency.core.train.training import (TRAIN_OUTPUTS, TrainConfig, TrainingObserver, check_out, planned_info,
                                         train)

#: the summary of a multi-seed training, in ``OUT``
SUMMARY = "replicates.json"


def seed_folder(out: str | Path, seed: int) -> Path:
    """Where the model of ``seed`` goes."""
    return Path(out) / f"seed-{seed}"


def train_seeds(cfg: TrainConfig, seeds: Sequence[int], *, manager: PluginManager | None = None,
                console: Console | None = None, resume: bool = False, overwrite: bool = False,
                plugin_config: Mapping[str, Any] | None = None, observer: TrainingObserver | None = None,
                replicate_label: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` once per seed into ``OUT/seed-<k>/`` (``cfg.seed`` is replaced by each seed) and write
    ``OUT/replicates.json``; returns its content: ``configuration``, ``seeds``, ``models`` (seed, checkpoint,
    ``skipped``). ``overwrite`` trains every seed again; ``resume`` continues an interrupted seed."""
    if not seeds:
        raise FluencyError("--seeds: no seed to train")
    manager = manager or get_plugin_manager()
    console = console or Console(stderr=True)
    check_out(Path(cfg.out), Path(cfg.images), overwrite)
    expected: str | None = None
    models: list[dict[str, Any]] = []
    for i, seed in enumerate(seeds, 1):
        sub = replace(cfg, seed=seed, out=str(seed_folder(cfg.out, seed)))
        final = Path(sub.out) / "final.pt"
        if final.exists() and not overwrite:
            expected = expected or _planned(sub, manager, plugin_config, replicate_label)
            _check_finished(final, expected, sub, manager, plugin_config, replicate_label)
            console.print(f"[yellow]note:[/yellow] seed {seed} ({i}/{len(seeds)}): {escape(str(final))} exists; "
                          "skipped (--overwrite trains it again)", highlight=False)
            models.append({"seed": seed, "checkpoint": str(final), "skipped": True})
            continue
        console.print(f"[bold]seed {seed}[/bold] ({i}/{len(seeds)}) → {escape(sub.out)}", highlight=False)
        again, fresh = _continuation(Path(sub.out), seed, resume, overwrite)
        result = train(sub, manager=manager, console=console, resume=again, overwrite=fresh,
                       plugin_config=plugin_config, observer=observer, replicate_label=replicate_label)
        expected = expected or result.configuration
        models.append({"seed": seed, "checkpoint": str(result.checkpoint), "skipped": False,
                       "seconds": round(result.seconds, 3), "warnings": result.warnings})
    summary = {"configuration": expected, "seeds": list(seeds), "models": models}
    atomic_write_json(Path(cfg.out) / SUMMARY, summary)
    return summary


def _continuation(out: Path, seed: int, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """``(resume, overwrite)`` for the training of one seed whose ``final.pt`` is missing: with ``resume`` an
    interrupted seed continues from ``last.pt`` (one stopped before its first epoch starts afresh); without,
    files of an interrupted seed are an error that says to resume."""
    if overwrite:
        return False, True
    if resume:
        return (out / "last.pt").exists(), not (out / "last.pt").exists()
    if any(p for pattern in TRAIN_OUTPUTS for p in out.glob(pattern)):
        raise FluencyError(f"{out}: the training of seed {seed} was interrupted; pass --resume to continue (seeds "
                           "with a final.pt are skipped), or --overwrite to train every seed again")
    return False, False


def _planned(cfg: TrainConfig, manager: PluginManager, plugin_config: Mapping[str, Any] | None,
             label: str | None) -> str:
    """The configuration this command trains (built, not trained)."""
    return str(planned_info(cfg, manager=manager, plugin_config=plugin_config,
                            replicate_label=label)["replicate"]["configuration"])


def _check_finished(final: Path, expected: str, cfg: TrainConfig, manager: PluginManager,
                    plugin_config: Mapping[str, Any] | None, label: str | None) -> None:
    """One line unless the finished model ``final`` is of the configuration ``expected`` (then it is skipped):
    a different command into the same ``--out`` must not mix configurations."""
    payload = read_checkpoint(final)
    found = (replicate_of(payload) or {}).get("configuration")
    if found == expected:
        return
    changed = differences(planned_info(cfg, manager=manager, plugin_config=plugin_config, replicate_label=label),
                          payload)
    raise FluencyError(f"{final} is a model of another configuration ({found} here, {expected} now"
                       + (f"; they differ in {', '.join(changed)}" if changed else "") + "): pass --overwrite to "
                       "train every seed again, or choose another --out")
