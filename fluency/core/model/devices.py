"""Pick the torch device from ``--device auto|cpu|cuda|mps``; torch's numeric settings, recorded and
made deterministic."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fluency.core.errors import FluencyError

DEVICES = ("auto", "cpu", "cuda", "mps")
#: ``fluency train --amp``: full precision, bfloat16 autocast (CPU or GPU, no gradient scaler needed) or float16
#: autocast with a gradient scaler (CUDA only)
AMP_MODES = ("off", "bf16", "fp16")

if TYPE_CHECKING:  # torch is imported where a device is used: the command line's options need DEVICES only
    import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then Apple's MPS, then the CPU; asking for an absent device is an error."""
    import torch

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


def torch_settings() -> dict[str, Any]:
    """What decides torch's floating-point results besides the inputs, for provenance: CPU threads (a reduction
    split over other threads sums in another order) and whether deterministic algorithms are enforced."""
    import torch

    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Within the block (``enabled``): one CPU thread for torch's kernels and deterministic algorithms (cuDNN
    too), so that results do not depend on the machine's core count or kernel choice; restored afterwards.

    One thread is what makes CPU results independent of the thread count: SAM and grad-norm otherwise differ
    by up to ~1e-3 relative between thread counts on images at ReLU/max-pool kinks (docs/user-guide.md,
    "Reproducibility"). CUDA's deterministic matrix products also need ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in
    the environment before the process starts, which is set here when absent. A CUDA operation that has no
    deterministic implementation (the backward pass of max-pooling, for one) warns rather than stops.
    """
    if not enabled:
        yield
        return
    import torch

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no deterministic kernel warns
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
