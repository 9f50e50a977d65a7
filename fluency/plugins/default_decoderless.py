"""Metric ``decoderless``: reconstruction without the decoder, by inverting the encoder.

For each image X, start from seeded noise N and minimise ‖μ(N) − μ(X)‖² (+ λ·TV(N), a
total-variation image prior as in representation inversion, Mahendran & Vedaldi 2015) with
Adam on the pixels of N, the model frozen. What is left measures how well the encoder alone
pins down the image (the report's §7.1):

- ``decoderless-latent``: final ‖μ(N) − μ(X)‖², how close the inversion got;
- ``decoderless-pixel``: mean squared pixel difference between N and X;
- ``decoderless-lpips``: LPIPS(N, X), when ``lpips = true``.

Lower = more fluent. The whole batch is optimised at once (the images are independent: the
loss is a sum over images, so each gets its own gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.api import FluencyError, per_image_noise


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image: mean absolute difference between neighbouring pixels."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def invert_encoder(model: Any, images: torch.Tensor, steps: int, lr: float, tv: float, seed: int,
                   image_ids: Sequence[str] | None = None) -> torch.Tensor:
    """Images whose latent means match those of ``images``, found from noise seeded per image (by ``seed`` and
    the image's id; default ids: the row numbers). Every image's loss and Adam state are its own, so the
    result does not depend on which other images share the batch."""
    with torch.no_grad():
        target = model.latent_code(images)
    ids = [str(i) for i in range(len(images))] if image_ids is None else list(image_ids)
    logits = per_image_noise(seed, ids, images.shape[1:], images.device, images.dtype).mul_(0.1)
    logits.requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            x = torch.sigmoid(logits)  # keeps pixels in (0, 1)
            loss = (model.latent_code(x) - target).pow(2).sum(1) + tv * total_variation(x)
            loss.sum().backward()
            opt.step()
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return torch.sigmoid(logits.detach())


class Decoderless(FluencyMetric):
    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        if batch.model is None:
            raise FluencyError("decoderless needs the model (MetricSpec needs='model')")
        o = self.options
        n = invert_encoder(batch.model, batch.images, int(o.get("steps", 200)), float(o.get("lr", 0.05)),
                           float(o.get("tv_weight", 0.0)), batch.seed, batch.image_ids)
        with torch.no_grad():
            latent = (batch.model.latent_code(n) - batch.model.latent_code(batch.images)).pow(2).sum(1)
            out = [MetricValues("decoderless-latent", latent),
                   MetricValues("decoderless-pixel", (n - batch.images).pow(2).flatten(1).mean(1))]
            if o.get("lpips", False):
                from fluency.blocks import lpips_model

                net = lpips_model(o.get("lpips_net", "alex"), o.get("lpips_weights")).to(n.device)
                out.append(MetricValues("decoderless-lpips", net(n, batch.images, normalize=True).flatten()))
        return out


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [MetricSpec(
        name="decoderless", factory=Decoderless, needs="model", requires=("latent",), higher_is_more_fluent=False,
        description="Invert the encoder from noise (optional TV prior); latent, pixel and LPIPS distance to the image.",
        options={"steps": Option("int", 200, "Adam iterations on the pixels", minimum=1),
                 "lr": Option("float", 0.05, "step size", minimum=0.0),
                 "tv_weight": Option("float", 0.0, "weight λ of the total-variation prior", minimum=0.0),
                 "lpips": Option("bool", False, "also report LPIPS(inverted, image)"),
                 "lpips_net": Option("str", "alex", "LPIPS backbone", choices=("alex", "vgg", "squeeze")),
                 "lpips_weights": Option("str", None, "local backbone state dict (see the lpips metric)")})]
