"""Metric ``lpips``: LPIPS distance between each image and its reconstruction (Zhang et al. 2018).

Lower = the model's reconstruction is perceptually closer = more efficient processing. The
reconstruction uses z = μ (deterministic); with ``samples`` = k > 0 it is instead the mean
LPIPS over k reconstructions from z ~ N(μ, σ²), each image's draws seeded by the run's seed
and its id alone, so the numbers repeat and do not depend on the batch size or order. LPIPS version 0.1, inputs in [0, 1] (``normalize=True``); the
network is frozen and in eval mode. Backbone weights: see :mod:`fluency.core.model.backbones`.
"""

from __future__ import annotations

from typing import Any

import torch

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.api import FluencyError, per_image_noise
from fluency.blocks import LPIPS_OPTIONS


class LPIPSMetric(FluencyMetric):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._net: torch.nn.Module | None = None


    def net(self, device: torch.device) -> torch.nn.Module:
        if self._net is None:
            from fluency.blocks import lpips_model

            self._net = lpips_model(self.options.get("net", "alex"), self.options.get("weights"))
        return self._net.to(device).eval()

    @torch.no_grad()
    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        if batch.model is None:
            raise FluencyError("lpips needs the model (MetricSpec needs='model')")
        x, net, k = batch.images, self.net(batch.images.device), int(self.options.get("samples", 0))
        if k == 0:
            recon = batch.model(x, sample=False).recon
            return [MetricValues("lpips", net(recon, x, normalize=True).flatten())]
        mu, logvar = batch.model.encode(x)
        # each image's k draws depend on the run's seed and its id alone, not on the batch
        noise = per_image_noise(batch.seed, batch.image_ids, (k, *mu.shape[1:]), x.device, mu.dtype)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for s in range(k):
            z = mu + noise[:, s] * torch.exp(0.5 * logvar)
            total += net(batch.model.decode(z), x, normalize=True).flatten().double()
        return [MetricValues("lpips", total / k)]


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [MetricSpec(
        name="lpips", factory=LPIPSMetric, needs="model", requires=("decoder",), higher_is_more_fluent=False,
        description="LPIPS distance between each image and its reconstruction (Zhang et al. 2018, v0.1).",
        options={**LPIPS_OPTIONS,
                 "samples": Option("int", 0, "0: z = mu; k > 0: mean over k seeded samples of z", minimum=0)})]
