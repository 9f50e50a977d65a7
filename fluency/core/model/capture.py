"""Capture layer outputs with forward hooks that are always removed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fluency.core.plugin.architecture import FluencyModel
from fluency.core.errors import FluencyError


def check_layers(model: FluencyModel, layers: Sequence[str]) -> None:
    """Raise a :class:`FluencyError` naming any layer the model does not have."""
    available = model.hookable_layers()
    unknown = [name for name in layers if name not in available]
    if unknown:
        raise FluencyError(f"unknown layer(s) {unknown} for this model; available: {list(available)}")


@contextmanager
def capture_activations(model: FluencyModel, layers: Sequence[str],
                        detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores each named layer's output in the yielded dict.

    Outputs are detached unless ``detach=False`` (training constraints need their
    gradients). The hooks are removed when the block ends, also on error, so a model
    is never left with stale hooks.
    """
    check_layers(model, layers)
    modules = model.hookable_layers()
    captured: dict[str, torch.Tensor] = {}
    handles: list[Any] = []

    def hook_for(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured[name] = output.detach() if detach else output

        return hook

    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def layer_shapes(model: FluencyModel, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """The output shape (without the batch) of every hookable layer, in forward order, for one grey
    ``height×width`` image: what ``fluency inspect`` lists."""
    layers = list(model.hookable_layers())
    channels = int(model.input_shape[0])
    probe = torch.full((1, channels, height, width), 0.5, device=next(model.parameters(), torch.empty(0)).device)
    with torch.no_grad(), capture_activations(model, layers) as acts:
        model(probe, sample=False)
    return {name: tuple(int(s) for s in acts[name].shape[1:]) for name in layers if name in acts}
