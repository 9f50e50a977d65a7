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

    def warnings(self, figure: Path | None) -> list[dict[str, str]]:
        """The warnings about this checkpoint on these stimuli (``figure``: its reconstruction grid, if drawn)."""
        if not self.active:
            return []
        shown = str(figure) if figure is not None and figure.exists() else None
        found = [collapse_warning(self.label, self.latent.record(), shown)]
        if self.fit_problem is not None:
            found.append(warning(self.label, "fit-unchecked", f"checkpoint {self.label}: cannot check whether the "
                                 f"stimuli fit the model: {self.fit_problem}"))
        elif self.fit:
            name = loss_name(loss_terms_from_config(self.info.get("loss") or {}))
            found.append(fit_warning(self.label, self.errors.record(name), self.info.get("fit"), shown))
        return [w for w in found if w is not None] + sparsity_warnings(self.label, self._sparsity(), "the stimuli")

    def _sparsity(self) -> list[dict[str, Any]]:
        """Per constrained layer: the constraint, its target and the mean activation over the stimuli."""
        return [{"constraint": name, "layer": layer, "target": constraint.target, "reached": total / self.n}
                for (name, constraint, layer), total in zip(self.constraints, self.sums) if self.n]


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
