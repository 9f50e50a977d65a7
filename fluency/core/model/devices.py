"""Pick the torch device from ``--device auto|cpu|cuda|mps``."""

from __future__ import annotations

import torch

from fluency.core.errors import FluencyError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then Apple's MPS, then the CPU; asking for an absent device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FluencyError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FluencyError("--device mps: Apple's MPS backend is not available")
    if name not in DEVICES:
        raise FluencyError(f"--device {name!r}: use one of {list(DEVICES)}")
    return torch.device(name)
