"""Metric ``image-stats``: low-level image statistics, the covariates reviewers ask for.

Not fluency measures (no direction): they let analyses control for low-level confounds.
Computed on the images as the model sees them (after resizing), per image:

- ``luminance``: mean of Y = 0.299 R + 0.587 G + 0.114 B (in [0, 1]);
- ``rms-contrast``: standard deviation of Y;
- ``spectral-slope``: slope of log amplitude vs log spatial frequency of Y's radially averaged
  Fourier amplitude spectrum (Hann-windowed, frequencies 1 … N/2 cycles per image); natural
  images are near −1, flatter (less negative) means more fine detail;
- ``edge-density``: fraction of pixels whose Sobel gradient magnitude of Y exceeds
  ``edge_threshold``;
- ``jpeg-bpp``: bits per pixel of the image encoded as JPEG (quality ``jpeg_quality``), a
  complexity proxy (Donderi 2006; Machado et al. 2015).
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl

LUMA = torch.tensor([0.299, 0.587, 0.114])


def luminance(images: torch.Tensor) -> torch.Tensor:
    """B×H×W luminance of B×C×H×W images in [0, 1] (grey images pass through)."""
    if images.shape[1] == 1:
        return images[:, 0]
    return torch.einsum("bchw,c->bhw", images, LUMA.to(images))


def spectral_slope(y: torch.Tensor) -> torch.Tensor:
    """Per image, the log-log slope of the radially averaged amplitude spectrum (frequencies 1..N/2)."""
    b, h, w = y.shape
    window = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float64),
                         torch.hann_window(w, periodic=False, dtype=torch.float64))
    y = y.double()
    amp = torch.fft.fftshift(torch.fft.fft2((y - y.mean(dim=(1, 2), keepdim=True)) * window), dim=(1, 2)).abs()
    fy, fx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(fx.double() ** 2 + fy.double() ** 2).round().long()
    freqs = torch.arange(1, min(h, w) // 2 + 1)
    mask = (radius >= 1) & (radius <= freqs[-1])
    idx = radius[mask] - 1
    sums = torch.zeros(b, len(freqs), dtype=torch.float64).index_add_(1, idx, amp[:, mask])
    counts = torch.zeros(len(freqs), dtype=torch.float64).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    logf = torch.log(freqs.double())
    loga = torch.log(sums / counts + 1e-12)
    lf = logf - logf.mean()
    return ((loga - loga.mean(1, keepdim=True)) * lf).sum(1) / (lf ** 2).sum()


def edge_density(y: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fraction of pixels with Sobel gradient magnitude above ``threshold`` (replicate padding)."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=y.dtype) / 8
    k = torch.stack([kx, kx.t()]).unsqueeze(1).to(y.device)
    g = F.conv2d(F.pad(y.unsqueeze(1), (1, 1, 1, 1), mode="replicate"), k)
    return (g.pow(2).sum(1).sqrt() > threshold).flatten(1).double().mean(1)


def jpeg_bits_per_pixel(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in images.detach().cpu():
        pixels = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buf, "JPEG", quality=quality)
        out.append(8 * buf.tell() / (pixels.shape[0] * pixels.shape[1]))
    return torch.tensor(out, dtype=torch.float64)


class ImageStats(FluencyMetric):
    @torch.no_grad()
    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        x = batch.images.float().cpu()
        y = luminance(x)
        return [MetricValues("luminance", y.flatten(1).mean(1)),
                MetricValues("rms-contrast", y.flatten(1).std(1, unbiased=False)),
                MetricValues("spectral-slope", spectral_slope(y)),
                MetricValues("edge-density", edge_density(y, float(self.options.get("edge_threshold", 0.1)))),
                MetricValues("jpeg-bpp", jpeg_bits_per_pixel(x, int(self.options.get("jpeg_quality", 75))))]


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [MetricSpec(
        name="image-stats", factory=ImageStats, needs="images", higher_is_more_fluent=None,
        description="Low-level covariates: luminance, RMS contrast, spectral slope, edge density, JPEG bits/pixel.",
        options={"edge_threshold": Option("float", 0.1, "Sobel magnitude threshold (image in [0, 1])", minimum=0.0),
                 "jpeg_quality": Option("int", 75, "JPEG quality for the complexity proxy", minimum=1, maximum=100)})]
