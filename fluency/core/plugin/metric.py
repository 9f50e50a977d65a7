"""The contract of a FluencyMetric plugin.

A metric turns one batch of images into one value per image, per layer where it
is per-layer. It is called batch by batch and must not keep a whole dataset's
activations; a metric that needs a pass over everything first (a reference
distribution, say) collects a small state in :meth:`FluencyMetric.compute` and
returns its values from :meth:`FluencyMetric.finish`.
"""

from __future__ import annotations

import zlib

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads when a metric computes: a plugin module that subclasses FluencyMetric lists fast
    import torch

    from fluency.core.plugin.architecture import FluencyModel


@dataclass(frozen=True)
class ModelDescription:
    """What a metric may know about the model besides its activations, recorded in every activation store.

    A batch read back from a store has no model, so metrics take their defaults from this
    description instead: ``default_metric_layers`` (the layers measured when the user names
    none), ``attention_layers()``, the architecture and the checkpoint's identity. It answers
    ``default_metric_layers`` and ``attention_layers()`` like a model does, so a metric's
    :meth:`FluencyMetric.layers` works with either.
    """

    architecture: str
    default_metric_layers: tuple[str, ...]
    attention: tuple[str, ...] = ()
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    input_shape: tuple[int, ...] = ()

    def attention_layers(self) -> list[str]:
        """The model's attention layers (as ``model.attention_layers()``)."""
        return list(self.attention)

    @classmethod
    def of(cls, model: FluencyModel, architecture: str, checkpoint: str = "", sha256: str = "") -> ModelDescription:
        """The description of a live model."""
        method = getattr(model, "attention_layers", None)
        attention = tuple(method()) if callable(method) else ()
        shape = tuple(int(s) for s in model.input_shape) if "image_size" in getattr(model, "options", {}) else ()
        return cls(architecture, tuple(model.default_metric_layers), attention, checkpoint, sha256, shape)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, as the store's ``_COMPLETE.json`` records it (:meth:`from_dict` reads it back)."""
        return {"architecture": self.architecture, "default_metric_layers": list(self.default_metric_layers),
                "attention_layers": list(self.attention), "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256, "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelDescription:
        """The description recorded by :meth:`as_dict` (missing fields take their defaults)."""
        return cls(str(data.get("architecture", "")), tuple(data.get("default_metric_layers") or ()),
                   tuple(data.get("attention_layers") or ()), str(data.get("checkpoint", "")),
                   str(data.get("checkpoint_sha256", "")), tuple(data.get("input_shape") or ()))


@dataclass
class MetricBatch:
    """Everything a metric may read about one batch.

    ``activations`` maps layer names to float32 tensors ``B×…`` (detached), from the live
    capture of a run or read back from an activation store: a metric cannot tell the two
    apart. ``description`` says which model produced them (its default and attention
    layers); use it, not ``model``, for defaults. ``images`` (B×C×H×W in [0, 1]) are present
    in a run and absent (None) when a store is measured, unless the spec ``needs="images"``
    and the user gave the images. Metrics whose spec ``needs="model"`` also get the model (in
    eval mode) and ``loss``, the checkpoint's training objective per image,
    ``loss(output, images) -> B`` for ``output = model(images, sample=False)`` (z = mu, so the loss
    is deterministic); ``loss.parts(output, images)`` gives each term of the architecture's
    :meth:`~fluency.core.plugin.architecture.FluencyModel.objective` (a VAE: ``loss``, ``recon``,
    ``kl``; a flow: ``loss``, ``nll_bpd``). Declare what the model must provide in the spec's
    ``requires``.
    """

    image_ids: Sequence[str]
    images: torch.Tensor | None = None
    activations: Mapping[str, torch.Tensor] = field(default_factory=dict)
    model: FluencyModel | None = None
    loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    seed: int = 0
    description: ModelDescription | None = None


@dataclass
class MetricValues:
    """One value per image of a batch for one (metric, layer); ``layer=None`` for whole-model values."""

    metric: str
    values: np.ndarray | torch.Tensor
    layer: str | None = None

    def as_numpy(self) -> np.ndarray:
        """The values as a flat float64 numpy array (from a tensor on any device, or a sequence)."""
        import torch

        v = self.values.detach().cpu().double().numpy() if isinstance(self.values, torch.Tensor) else self.values
        return np.asarray(v, dtype=np.float64).reshape(-1)


def units_as_rows(activations: torch.Tensor) -> torch.Tensor:
    """A layer's B×… activations as B×N rows *in memory order*: a view, no copy, for contiguous and
    channels-last tensors (``flatten(1)`` copies a channels-last tensor to NCHW order first).

    For metrics that do not depend on the order of a layer's units (Gini, Hoyer, counts, norms);
    a per-channel or spatial computation must keep the B×C×H×W layout instead.
    """
    import torch

    t = activations.detach()
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.flatten(1)


class FluencyMetric:
    """Base class of metrics. Subclasses take their validated options as keyword arguments.

    ``layers`` (a list of layer names or None) is conventional: None means the
    model's ``default_metric_layers``. Whether higher values mean more fluent is the
    spec's ``higher_is_more_fluent``, the one place it is declared.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options

    def layers(self, model: ModelDescription | FluencyModel) -> list[str]:
        """Names of the layers whose activations :meth:`compute` reads (empty: none), given the model's
        description (or the model itself: both have ``default_metric_layers``)."""
        chosen = self.options.get("layers")
        return list(chosen) if chosen else list(model.default_metric_layers)

    def batch_layers(self, batch: MetricBatch) -> list[str]:
        """The layers to read in ``batch``: the ``layers`` option, else the defaults of the batch's model
        description, else (neither, as in unit tests) every captured layer; a layer that is not in the
        batch is an error."""
        from fluency.core.errors import FluencyError

        if self.options.get("layers"):
            names = list(self.options["layers"])
        elif batch.description is not None:
            names = self.layers(batch.description)
        elif batch.model is not None:
            names = self.layers(batch.model)
        else:
            names = list(batch.activations)
        missing = [n for n in names if n not in batch.activations]
        if missing:
            raise FluencyError(f"{missing} not among the captured layers {sorted(batch.activations)}")
        return names

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        """Values for the images of ``batch``."""
        raise NotImplementedError

    def finish(self) -> list[tuple[Sequence[str], MetricValues]]:
        """Values that could only be computed after the last batch, as ``(image_ids, values)`` pairs."""
        return []

    def state(self) -> dict[str, Any] | None:
        """Fitted state to save with the run (tensors and plain types, loadable with ``weights_only=True``)."""
        return None


def per_image_noise(seed: int, image_ids: Sequence[str], shape: Sequence[int], device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` for each image (B×shape; ``dtype`` default float32), each drawn from a
    generator seeded by the run's ``seed`` and that image's id alone (crc32, not Python's per-process hash): a metric that draws
    random numbers through it gives values that depend neither on the batch size nor on the order."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    out = torch.empty((len(image_ids), *shape), device=device, dtype=dtype)
    for row, image_id in enumerate(image_ids):
        key = (int(seed) * 1_000_003 + zlib.crc32(str(image_id).encode("utf-8"))) % (1 << 63)
        generator = torch.Generator(device=out.device).manual_seed(key)
        out[row] = torch.randn(tuple(shape), generator=generator, device=out.device, dtype=dtype)
    return out
