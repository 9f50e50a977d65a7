"""The checks ``fluency run`` makes of every checkpoint it measures, from the forward passes it makes anyway.

Per batch, :meth:`CheckpointChecks.add` reads the pass's output and captured activations: the latent's KL per
dimension (a VAE's μ and log σ²), the per-image reconstruction error under the checkpoint's own loss (only
when the run decodes for a metric anyway, or ``--check-fit``), and the mean activation of every layer a
training constraint acted on. :meth:`CheckpointChecks.warnings` then compares them with what the checkpoint
recorded at training (:mod:`fluency.core.model.diagnostics` gives the rules). Models built without a checkpoint
(``--model``) and models without a decoder are exempt; so are stores (``fluency measure``), which have no model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluency.core.errors import FluencyError
from fluency.core.model.checkpoint import LoadedCheckpoint
from fluency.core.model.diagnostics import (ErrorSummary, LatentActivity, collapse_warning, fit_warning, loss_name,
                                            sparsity_warnings, warning)
from fluency.core.model.losses import loss_terms_from_config
from fluency.core.plugin.architecture import VAEOutput
from fluency.core.plugin.manager import PluginManager
from fluency.core.plugin.specs import MetricSpec


def decodes(metric_specs: Mapping[str, MetricSpec], check_fit: bool) -> bool:
    """Whether the run compares the stimuli's reconstruction error with the training one: a metric needs the
    decoder anyway, or ``--check-fit`` asks for it."""
    return check_fit or any("decoder" in spec.requires for spec in metric_specs.values())


class CheckpointChecks:
    """The numbers of one checkpoint's checks, accumulated over the run's batches."""

    def __init__(self, loaded: LoadedCheckpoint, manager: PluginManager, fit: bool) -> None:
        self.label, self.info = loaded.label, loaded.info
        built = "weights" in loaded.info  # --model: no training records to compare with
        self.active = not built and "decoder" in loaded.model.provides
        self.fit = fit and self.active
        self.latent, self.errors = LatentActivity(), ErrorSummary()
        self.fit_problem: str | None = None
        self.constraints = _constraints(loaded, manager) if not built else []
        self.sums = [0.0] * len(self.constraints)  # Σ over images of each (constraint, layer)'s mean activation
        self.n = 0

    @property
    def layers(self) -> list[str]:
        """The constrained layers, which the run captures too."""
        return list(dict.fromkeys(layer for _, _, layer in self.constraints))

    def add(self, output: Any, images: torch.Tensor, acts: Mapping[str, torch.Tensor], loss: Any) -> None:
        """Take in one batch: its forward pass's ``output``, the captured ``acts``, the checkpoint's ``loss``."""
        if not self.active:
            return
        if isinstance(output, VAEOutput):
            self.latent.add(output.mu, output.logvar)
        if self.fit and self.fit_problem is None:
            try:
                self.errors.add(loss.parts(output, images)["recon"])
            except FluencyError as exc:  # the loss cannot be built here (e.g. LPIPS weights offline)
                self.fit_problem = str(exc)
        for i, (_, constraint, layer) in enumerate(self.constraints):  # captured: see ``layers``
            self.sums[i] += constraint.mean_activation(acts[layer]) * len(images)
        self.n += len(images)

    def snapshot(self) -> dict[str, Any]:
        """The accumulated numbers as JSON-ready data, so that the checks of the shards of a run (measured in
        other processes) are merged before any rule is applied (:func:`merged_warnings`)."""
        latent = self.latent
        return {"active": self.active, "fit": self.fit, "fit_problem": self.fit_problem,
                "loss": loss_name(loss_terms_from_config(self.info.get("loss") or {})) if self.active else "",
                "training_fit": self.info.get("fit"),
                "latent": None if latent.sums is None else {"sums": latent.sums.tolist(), "n": latent.n},
                "errors": [float(v) for part in self.errors.values for v in part],
                "constraints": [{"constraint": name, "layer": layer, "target": constraint.target, "sum": total}
                                for (name, constraint, layer), total in zip(self.constraints, self.sums)],
                "n": self.n}

    def warnings(self, figure: Path | None) -> list[dict[str, str]]:
        """The warnings about this checkpoint on these stimuli (``figure``: its reconstruction grid, if drawn)."""
        return merged_warnings(self.label, [self.snapshot()], figure)


def merged_warnings(label: str, snapshots: Sequence[Mapping[str, Any]], figure: Path | None) -> list[dict[str, str]]:
    """The warnings about checkpoint ``label`` from the :meth:`CheckpointChecks.snapshot` of every part of the
    stimuli it measured (shards, in any order): sums and counts are added, per-image errors pooled."""
    if not snapshots or not snapshots[0].get("active"):
        return []
    first = snapshots[0]
    shown = str(figure) if figure is not None and figure.exists() else None
    latent = LatentActivity()
    for snap in snapshots:
        if snap.get("latent"):
            sums = torch.tensor(snap["latent"]["sums"], dtype=torch.float64)
            latent.sums = sums if latent.sums is None else latent.sums + sums
            latent.n += int(snap["latent"]["n"])
    found = [collapse_warning(label, latent.record(), shown)]
    problem = next((s["fit_problem"] for s in snapshots if s.get("fit_problem")), None)
    if problem is not None:
        found.append(warning(label, "fit-unchecked", f"checkpoint {label}: cannot check whether the stimuli fit the "
                             f"model: {problem}"))
    elif first.get("fit"):
        errors = ErrorSummary()
        errors.values = [np.asarray([v for s in snapshots for v in s.get("errors") or []], np.float64)]
        found.append(fit_warning(label, errors.record(first["loss"]), first.get("training_fit"), shown))
    n = sum(int(s.get("n") or 0) for s in snapshots)
    entries = [{"constraint": c["constraint"], "layer": c["layer"], "target": c["target"],
                "reached": sum(s["constraints"][i]["sum"] for s in snapshots) / n}
               for i, c in enumerate(first.get("constraints") or [])] if n else []
    return [w for w in found if w is not None] + sparsity_warnings(label, entries, "the stimuli")


def _constraints(loaded: LoadedCheckpoint, manager: PluginManager) -> list[tuple[str, Any, str]]:
    """``(name, constraint, layer)`` of every layer a training constraint with a target acted on; constraints
    that cannot be rebuilt here (a plugin not installed, options it no longer takes) are left unchecked."""
    out: list[tuple[str, Any, str]] = []
    entries = loaded.info.get("constraints")
    for entry in entries if isinstance(entries, Sequence) else []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            continue
        try:
            constraint = manager.get("constraint", entry["name"]).load()(**dict(entry.get("options") or {}))
            layers = constraint.layers(loaded.model)
        except (FluencyError, TypeError, ValueError):
            continue
        if constraint.target is not None:
            out += [(entry["name"], constraint, layer) for layer in layers if layer in loaded.model.hookable_layers()]
    return out
