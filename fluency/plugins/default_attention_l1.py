"""Metric ``attention-l1``: the L1 norm of an image's channel-attention weights, per attention layer.

The report's attention metric: with CBAM channel attention (Woo et al. 2018) the weights M_c
of an image say how much each channel is let through; their L1 norm Σ_c |M_c| is small when
the network attends to few channels. With a softmax gate the weights sum to 1, so the L1 norm
is constant — use the sigmoid gate (or read the weights' Gini) there.

Direction: ``higher_is_more_fluent=False``. A lower L1 norm means the network lets fewer channels
through for the image: a more selective, more economical response, the attention counterpart of
a sparser code (as for ``lepsilon``, where more active units is less fluent). Fluency theory then
predicts that attention-l1 correlates *negatively* with beauty, which is what the study expected;
the summary's "fluent?" column reads "yes" for a negative correlation with the rating.
"""

from __future__ import annotations

from typing import Any

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.api import FluencyError, require_attention_layers


class AttentionL1(FluencyMetric):
    def layers(self, model: Any) -> list[str]:
        available = require_attention_layers(model, "attention-l1")
        chosen = self.options.get("layers")
        unknown = [name for name in chosen or [] if name not in available]
        if unknown:
            raise FluencyError(f"attention-l1: {unknown} are not attention layers; the model has {available}")
        return list(chosen) if chosen else available

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        names = self.batch_layers(batch)
        return [MetricValues("attention-l1", batch.activations[name].flatten(1).abs().sum(1), name) for name in names]


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [MetricSpec(
        name="attention-l1", factory=AttentionL1, needs="activations", higher_is_more_fluent=False,
        description="L1 norm of each image's CBAM channel-attention weights, per attention layer (higher = less "
                    "selective = less fluent).",
        options={"layers": Option("list[str]", None, "attention layers (default: all of the model's)")})]
