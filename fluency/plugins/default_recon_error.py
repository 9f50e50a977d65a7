"""Metrics ``recon-error`` and ``elbo``: how well the model reconstructs each image (lower = more fluent).

``recon-error`` compares an image with its reconstruction (z = μ, eval mode) in pixel space:
``l1`` and ``l2`` are means over pixels and channels, ``ssim`` is 1 − SSIM (pytorch-msssim).
``elbo`` reports the per-image terms of the checkpoint's own training loss: ``elbo-recon``
(the weighted reconstruction terms), ``elbo-kl`` (KL of the encoder's Gaussian to N(0, I)) and
``elbo`` = recon + β·KL, the negative ELBO for β = 1 with an L2 loss.
"""

from __future__ import annotations

import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.api import FluencyError, LOSSES


def _reconstruct(batch: MetricBatch) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.model is None:
        raise FluencyError("this metric needs the model (MetricSpec needs='model')")
    with torch.no_grad():
        return batch.model(batch.images, sample=False).recon, batch.images


class ReconError(FluencyMetric):
    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        recon, x = _reconstruct(batch)
        out = []
        for kind in self.options.get("kinds") or ["l1", "l2", "ssim"]:
            options = {"win_size": int(self.options.get("ssim_window", 11))} if kind == "ssim" else {}
            distance = LOSSES[kind].build(options, reduction="mean")  # the one registry of image distances
            out.append(MetricValues(f"recon-{kind}", distance(recon.float(), x.float())))
        return out


class ELBO(FluencyMetric):
    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        if batch.model is None or not hasattr(batch.loss, "parts"):
            raise FluencyError("elbo needs the model and the checkpoint's loss (MetricSpec needs='model')")
        with torch.no_grad():
            parts = batch.loss.parts(batch.model(batch.images, sample=False), batch.images)  # type: ignore[union-attr]
        return [MetricValues("elbo", parts["loss"]), MetricValues("elbo-recon", parts["recon"]),
                MetricValues("elbo-kl", parts["kl"])]


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(name="recon-error", factory=ReconError, needs="model", requires=("decoder",),
                   higher_is_more_fluent=False,
                   description="Pixel-space L1, L2 (means) and 1 − SSIM between each image and its reconstruction.",
                   options={"kinds": Option("list[str]", ["l1", "l2", "ssim"], "which distances",
                                            choices=("l1", "l2", "ssim")),
                            "ssim_window": Option("int", 11, "SSIM Gaussian window (odd)", minimum=3)}),
        MetricSpec(name="elbo", factory=ELBO, needs="model", requires=("decoder", "objective"),
                   higher_is_more_fluent=False,
                   description="Per-image terms of the checkpoint's loss: reconstruction, KL and their sum.",
                   options={}),
    ]
