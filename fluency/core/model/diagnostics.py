"""Warnings a researcher must hear about a trained model: a collapsed latent, stimuli outside the model's
training distribution, a sparsity constraint that did not take effect.

Training records what the checks need in every checkpoint (``latent``, ``fit``, ``sparsity``); measuring
computes the same numbers over the stimuli from the run's own forward passes. The rules:

- **collapsed latent**: a latent dimension is *active* when its KL(q(z_j|x) ‖ N(0, 1)), averaged over the
  images, exceeds :data:`ACTIVE_KL` = 0.01 nats (the KL form of Burda et al. 2016's activity threshold; they
  use Cov_x(E[z_j|x]) > 0.01). The latent has *collapsed* when the mean KL per dimension is at most
  :data:`ACTIVE_KL`: the decoder then ignores the image and draws nearly one average image for every input;
- **out of distribution**: the median per-image reconstruction error of the stimuli (the checkpoint's own
  reconstruction loss, z = μ) exceeds the 95th percentile of that error on the model's validation images;
- **sparsity not reached**: a constraint with a target ρ (``kl-sparsity``) whose layer's mean activation
  (as the constraint measures it, e.g. mean tanh(x)) is above :data:`SPARSITY_FACTOR` × ρ.

Each warning is ``{"checkpoint", "kind", "message"}`` (:data:`KINDS`); its message is one line that names the
checkpoint, says what the numbers mean and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fluency.core.plugin.architecture import kl_terms

#: a latent dimension is active when its mean KL over the images exceeds this many nats
ACTIVE_KL = 0.01
#: a constraint with target ρ did not take effect when the mean activation reached exceeds this factor × ρ
SPARSITY_FACTOR = 2.0
#: the kinds of warning
KINDS = ("collapsed-latent", "out-of-distribution", "fit-unchecked", "sparsity-not-reached")


def warning(checkpoint: str, kind: str, message: str) -> dict[str, str]:
    """One warning as the manifest records it."""
    return {"checkpoint": checkpoint, "kind": kind, "message": message}


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_j, e^{lv_j}) ‖ N(0, 1)) of every latent dimension of every image, B×k (nats)."""
    return kl_terms(mu.detach().float().flatten(1), logvar.detach().float().flatten(1))


class LatentActivity:
    """The mean KL per latent dimension over images, accumulated batch by batch."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.n = 0

    def add(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        kl = kl_per_dimension(mu, logvar).sum(0).cpu().double()
        self.sums = kl if self.sums is None else self.sums + kl
        self.n += int(mu.shape[0])

    def record(self) -> dict[str, Any] | None:
        """``{dims, kl_total, kl_per_dim, active, threshold}`` (nats, means over the images), or None."""
        if self.sums is None or not self.n:
            return None
        mean = self.sums / self.n
        return {"dims": int(mean.numel()), "kl_total": float(mean.sum()), "kl_per_dim": float(mean.mean()),
                "active": int((mean > ACTIVE_KL).sum()), "threshold": ACTIVE_KL}


def _figure_hint(figure: str | None) -> str:
    return f"; see {figure}" if figure else ""


def collapse_warning(checkpoint: str, latent: Any, figure: str | None = None) -> dict[str, str] | None:
    """The collapsed-latent warning for a ``latent`` record (:meth:`LatentActivity.record`), or None."""
    if not _is_record(latent, ("dims", "kl_total", "kl_per_dim", "active")) or latent["kl_per_dim"] > ACTIVE_KL:
        return None
    message = (f"checkpoint {checkpoint}: collapsed latent: KL {latent['kl_per_dim']:.2g} nats per dimension "
               f"({latent['kl_total']:.2g} in total), {latent['active']} of {latent['dims']} dimensions active "
               f"(KL > {ACTIVE_KL} nats): the decoder ignores the image (posterior collapse), so its "
               f"reconstruction and model metrics say little; retrain with a smaller --beta, --beta-warmup or "
               f"a larger reconstruction weight{_figure_hint(figure)}")
    return warning(checkpoint, "collapsed-latent", message)


class ErrorSummary:
    """Per-image reconstruction errors, collected batch by batch, summarised as training records them."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []

    def add(self, errors: torch.Tensor) -> None:
        self.values.append(errors.detach().double().flatten().cpu().numpy())

    def record(self, loss: str) -> dict[str, Any] | None:
        """``{loss, n, mean, sd, p50, p95}`` of the errors (``loss`` names the loss), or None without any."""
        if not self.values:
            return None
        x = np.concatenate(self.values)
        if not x.size or not np.isfinite(x).all():
            return None
        return {"loss": loss, "n": int(x.size), "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1
                else 0.0, "p50": float(np.median(x)), "p95": float(np.percentile(x, 95))}


def loss_name(terms: Sequence[Mapping[str, Any]]) -> str:
    """A checkpoint's reconstruction loss as one name: ``l2``, ``l2 + 1000·lpips``."""
    return " + ".join(str(t.get("name")) if float(t.get("weight", 1.0)) == 1.0 else
                      f"{float(t['weight']):g}·{t.get('name')}" for t in terms) or "?"


def _is_record(value: Any, numbers: Sequence[str]) -> bool:
    """Whether ``value`` is a dict whose ``numbers`` are all finite numbers (a damaged record is no record)."""
    return isinstance(value, Mapping) and all(
        isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool) and math.isfinite(value[k])
        for k in numbers)


def fit_warning(checkpoint: str, stimuli: Any, fit: Any, figure: str | None = None) -> dict[str, str] | None:
    """The out-of-distribution warning when the stimuli's median error exceeds the validation 95th percentile;
    the fit-unchecked one when the checkpoint records no validation error; else None."""
    if not _is_record(stimuli, ("p50",)):
        return None
    if not _is_record(fit, ("p95", "p50")):
        return warning(checkpoint, "fit-unchecked",
                       f"checkpoint {checkpoint}: cannot check whether the stimuli fit the model: the checkpoint "
                       "records no validation reconstruction error (an older checkpoint, or trained without "
                       "validation images); retrain it with this fluency to have the check")
    if stimuli["p50"] <= fit["p95"]:
        return None
    message = (f"checkpoint {checkpoint}: stimuli out of the training distribution: median reconstruction error "
               f"{stimuli['p50']:.4g} ({stimuli.get('loss', '?')}) exceeds the 95th percentile of its validation "
               f"images ({fit['p95']:.4g}; median {fit['p50']:.4g}), so its metrics may measure unfamiliarity "
               f"rather than fluency; train a model on images like these (fluency train){_figure_hint(figure)}")
    return warning(checkpoint, "out-of-distribution", message)


def sparsity_warnings(checkpoint: str, entries: Any, where: str) -> list[dict[str, str]]:
    """A warning per constrained layer whose mean activation (``reached``, over ``where``) is above
    :data:`SPARSITY_FACTOR` × its ``target``; entries without a target (``l1-activation``) are only recorded."""
    out = []
    for e in entries if isinstance(entries, list) else []:
        if not _is_record(e, ("target", "reached")) or e["reached"] <= SPARSITY_FACTOR * e["target"]:
            continue
        message = (f"checkpoint {checkpoint}: sparsity constraint {e.get('constraint')} did not take effect on "
                   f"layer {e.get('layer')}: mean activation {e['reached']:.3g} over {where}, target ρ = "
                   f"{e['target']:g} (more than {SPARSITY_FACTOR:g}×), so the model is not the sparse one asked "
                   "for; raise its weight, or remove normalisation (e.g. instance norm) before that layer")
        out.append(warning(checkpoint, "sparsity-not-reached", message))
    return out
