"""Architecture ``glow-small``: a small multi-scale Glow (Kingma & Dhariwal 2018) built on normflows.

Data → latent, for images ``B×3×S×S`` in [0, 1]:

1. **Dequantisation and logit.** In training mode ``x + u/256`` with ``u ~ U(0, 1)`` per pixel; in eval
   mode ``x + 0.5/256`` (the centre of the noise's support, so values are reproducible). Then
   ``y = α + (1 − 2α)·x̃`` (α = 0.05) and ``h = logit(y)``, whose log-det per pixel is
   ``ln(1 − 2α) − ln y − ln(1 − y)`` (as in RealNVP).
2. **``levels`` scales**, each: squeeze (2×2 space-to-depth, normflows ``Squeeze``), ``steps`` normflows
   ``GlowBlock``\\ s (actnorm with data-dependent initialisation on the first batch, invertible 1×1
   convolution in LU form, affine coupling with a sigmoid scale), then, except at the last scale, the
   second half of the channels is factored out as a latent.
3. **Prior**: a standard normal on every latent (not Glow's learned conditional split prior), so the
   whole latent ``z`` is N(0, I) and comparable across scales.

``z`` is the factored-out latents, coarsest last, flattened and concatenated (B×D, D = 3·S²). Hookable
layers (identity taps, since normflows modules return ``(tensor, log_det)`` tuples): ``scaleL.stepK``
after step K of scale L for K < ``steps``; ``scaleL``, the scale's output after its last step (before
the split); and ``z``. The default metric layers are the ``scaleL``.

normflows names directions the other way round: its ``forward`` maps latent → data and its ``inverse``
data → latent; here ``forward`` is data → latent, as fluency's contract has it.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import normflows as nf
import torch
from fluency.api import FlowOutput, FluencyFlow
from fluency.blocks import check_image_size
from torch import nn

#: the logit transform keeps pixels in [α, 1 − α] before the logit
ALPHA = 0.05
#: the number of 8-bit pixel values: the dequantisation bin width is 1/BINS
BINS = 256


class Scale(nn.Module):
    """One scale: squeeze, then Glow steps, with an identity tap after each step."""

    def __init__(self, channels: int, steps: int, hidden_channels: int) -> None:
        super().__init__()
        self.squeeze = nf.flows.Squeeze()
        with warnings.catch_warnings():  # normflows 1.7.3 builds the LU form with torch.lu: not the user's concern
            warnings.filterwarnings("ignore", message="torch.lu is deprecated", category=UserWarning)
            self.steps = nn.ModuleList(nf.flows.GlowBlock(4 * channels, hidden_channels, split_mode="channel",
                                                          scale=True, scale_map="sigmoid", use_lu=True)
                                       for _ in range(steps))
        self.taps = nn.ModuleList(nn.Identity() for _ in range(steps))

    def to_latent(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data → latent through this scale; the output and its log|det| per image."""
        h, _ = self.squeeze.inverse(h)  # space-to-depth: volume preserving
        log_det = h.new_zeros(h.shape[0])
        for step, tap in zip(self.steps, self.taps, strict=True):
            h, step_log_det = step.inverse(h)
            log_det = log_det + step_log_det
            h = tap(h)
        return h, log_det

    def to_data(self, h: torch.Tensor) -> torch.Tensor:
        """Latent → data through this scale (the exact inverse of :meth:`to_latent`)."""
        for step in reversed(self.steps):
            h, _ = step(h)
        return self.squeeze(h)[0]


class GlowSmall(FluencyFlow):
    """The ``glow-small`` model; see the module docstring."""

    default_metric_layers: ClassVar[tuple[str, ...]] = ("scale1", "scale2")  # per instance: one per scale
    encoder_prefixes: ClassVar[tuple[str, ...]] = ("scales.",)  # the whole flow maps images to their code

    def __init__(self, image_size: int = 32, levels: int = 2, steps: int = 4, hidden_channels: int = 64) -> None:
        check_image_size("glow-small", image_size, levels)
        super().__init__(image_size=image_size, levels=levels, steps=steps, hidden_channels=hidden_channels)
        channels, side = 3, image_size
        scales, shapes = [], []
        for level in range(levels):
            scales.append(Scale(channels, steps, hidden_channels))
            channels, side = 4 * channels, side // 2
            if level < levels - 1:
                channels //= 2  # the other half is factored out
            shapes.append((channels, side, side))
        self.scales = nn.ModuleList(scales)
        #: the (C, H, W) of each latent in ``z``'s order: one per scale, the last scale's output last
        self.latent_shapes: tuple[tuple[int, int, int], ...] = tuple(shapes)
        self.z_tap = nn.Identity()
        self.default_metric_layers = tuple(f"scale{i}" for i in range(1, levels + 1))  # type: ignore[misc]

    def hookable_layers(self) -> dict[str, nn.Module]:
        """The taps in forward order: ``scaleL.stepK`` (K < steps), ``scaleL`` per scale, then ``z``."""
        layers: dict[str, nn.Module] = {}
        for i, scale in enumerate(self.scales, 1):
            for k, tap in enumerate(scale.taps, 1):
                layers[f"scale{i}" if k == len(scale.taps) else f"scale{i}.step{k}"] = tap
        layers["z"] = self.z_tap
        return layers

    def latent_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent ``z`` (B×D) of images ``x`` and log|det ∂z/∂x̃| per image, x̃ the dequantised image."""
        x = x + (torch.rand_like(x) if self.training else 0.5) / BINS
        y = ALPHA + (1 - 2 * ALPHA) * x
        h = torch.log(y) - torch.log1p(-y)
        log_det = (math.log(1 - 2 * ALPHA) - torch.log(y) - torch.log1p(-y)).flatten(1).sum(1)
        latents = []
        for level, scale in enumerate(self.scales):
            h, scale_log_det = scale.to_latent(h)
            log_det = log_det + scale_log_det
            if level < len(self.scales) - 1:
                h, factored = h.chunk(2, dim=1)
                latents.append(factored.flatten(1))
        latents.append(h.flatten(1))
        return self.z_tap(torch.cat(latents, dim=1)), log_det

    def forward(self, x: torch.Tensor, sample: bool = True) -> FlowOutput:
        """``z`` and log p(x) − D·ln 256 under the standard-normal prior (``sample`` is ignored)."""
        z, log_det = self.latent_and_log_det(x)
        dims = z.shape[1]
        log_prior = -0.5 * (z.pow(2).sum(1) + dims * math.log(2 * math.pi))
        return FlowOutput(z, log_prior + log_det - dims * math.log(BINS), dims)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """The image (B×3×S×S, clamped to [0, 1]) whose eval-mode latent is ``z`` (B×D)."""
        sizes = [c * h * w for c, h, w in self.latent_shapes]
        z = z.flatten(1)
        if z.shape[1] != sum(sizes):
            raise ValueError(f"glow-small: a latent has {sum(sizes)} values per image, got {z.shape[1]}")
        parts = z.split(sizes, dim=1)
        h = parts[-1].reshape(-1, *self.latent_shapes[-1])
        for level in reversed(range(len(self.scales))):
            if level < len(self.scales) - 1:
                h = torch.cat([h, parts[level].reshape(-1, *self.latent_shapes[level])], dim=1)
            h = self.scales[level].to_data(h)
        x = (torch.sigmoid(h) - ALPHA) / (1 - 2 * ALPHA) - 0.5 / BINS
        return x.clamp(0.0, 1.0)
