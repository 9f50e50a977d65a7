"""``fluency train --amp``: automatic mixed precision for the forward pass.

``bf16`` runs the model's forward pass under ``torch.autocast`` with bfloat16 (on the CPU too, where it is mostly
useful to check a run; on a GPU of compute capability 8 or more it is faster); bfloat16 has float32's range, so
no gradient scaling is needed and every optimizer, SAM's two passes included, is stepped as usual. ``fp16`` uses
float16 on CUDA with a gradient scaler: the loss is scaled before the backward pass, the gradients unscaled
before the step, and a step whose gradients overflowed is skipped. The scaler steps an optimizer without a
closure, so ``fp16`` refuses an optimizer that evaluates the loss itself (``requires_closure``, e.g. SAM).

In every mode the weights, the optimizer's state and the checkpoints stay float32, and the objective and the
constraints are computed in float32 from the forward pass's outputs (:func:`to_float32`), so the logged terms
are comparable across modes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch

from fluency.core.errors import OptionError
from fluency.core.model.devices import AMP_MODES

#: the autocast type of each of :data:`~fluency.core.model.devices.AMP_MODES`
DTYPES: dict[str, torch.dtype | None] = dict(zip(AMP_MODES, (None, torch.bfloat16, torch.float16)))


def check_amp(mode: str) -> str:
    """``mode`` if it is one of :data:`AMP_MODES`, else one :class:`OptionError` line."""
    if mode not in AMP_MODES:
        raise OptionError(f"train: amp {mode!r}: use one of {list(AMP_MODES)}")
    return mode


def check_amp_device(mode: str, device: torch.device) -> None:
    """One :class:`OptionError` line when ``mode`` cannot run on ``device``."""
    if mode == "fp16" and device.type != "cuda":
        raise OptionError(f"--amp fp16 needs a CUDA device (float16 training needs a gradient scaler), and this run "
                          f"is on {device.type}; use --amp bf16, which also runs on the CPU, or --amp off")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise OptionError("--amp bf16: this GPU has no bfloat16 support (compute capability 8 or more is needed); "
                          "use --amp fp16")


def check_amp_optimizer(mode: str, name: str, optimizer: Any) -> None:
    """One :class:`OptionError` line when ``mode`` cannot step ``optimizer`` (the plugin ``name``)."""
    if mode == "fp16" and getattr(optimizer, "requires_closure", False):
        raise OptionError(f"--amp fp16 cannot train with optimizer {name!r}: it evaluates the loss itself (more "
                          "than once per step), and float16's gradient scaler steps an optimizer without a closure; "
                          "use --amp bf16 with it (no scaler needed), or --amp off")


@dataclass(frozen=True)
class Precision:
    """The autocast of a training run's forward passes and, for ``fp16``, its gradient scaler."""

    mode: str
    device_type: str
    scaler: torch.amp.GradScaler | None

    @classmethod
    def build(cls, mode: str, device: torch.device) -> Precision:
        check_amp_device(check_amp(mode), device)
        scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        return cls(mode, device.type, scaler)

    @property
    def reduced(self) -> bool:
        """Whether forward passes run in reduced precision."""
        return DTYPES[self.mode] is not None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's autocast (nothing when ``off``)."""
        dtype = DTYPES[self.mode]
        return torch.autocast(self.device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_float32(value: Any) -> Any:
    """``value`` (a tensor, or a dataclass, tuple, list or dict holding tensors) with each reduced-precision
    floating tensor as float32 (differentiably): what the objective and constraints compute from."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float64 else value
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: to_float32(getattr(value, f.name)) for f in fields(value) if f.init})
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_float32(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(to_float32(v) for v in value)
    return value

