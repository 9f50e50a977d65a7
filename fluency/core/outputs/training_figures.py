"""The figures ``fluency train`` draws after each epoch, as a training observer.

The train layer may not import the output layer, so :func:`fluency.core.train.training.train`
takes an observer; the command line passes :class:`TrainingFigures` unless ``--no-figures``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fluency.core.outputs.figures import reconstruction_grid, training_curves

if TYPE_CHECKING:
    from fluency.core.train.training import EpochEnd


class TrainingFigures:
    """After each epoch: ``figures/curves.png`` (every epoch so far) and ``figures/recon-epoch-NNN.png``
    (the first ``n_images`` validation images above their reconstructions; none without validation images or
    for a model without a decoder)."""

    def __init__(self, n_images: int = 8) -> None:
        self.n_images = n_images

    def epoch_end(self, state: EpochEnd) -> None:
        folder = state.out / "figures"
        training_curves(state.history, folder / "curves.png")
        if state.val_indices and "decoder" in getattr(state.model, "provides", ()):
            reconstruction_grid(state.model, state.source, list(state.val_indices[:self.n_images]),
                                folder / f"recon-epoch-{state.epoch:03d}.png", state.device)
