"""Architecture ``sparse-coding``: a dictionary of image patches with sparse codes (Olshausen & Field 1996), the
encoder-only baseline model of V1 that Renoult, Bovet & Raymond (2016) related to facial attractiveness.

An image (``in_channels`` × ``image_size``², grey by default as in Olshausen & Field) is cut into the grid of
non-overlapping ``patch_size``² patches (``image_size`` a multiple of ``patch_size``). Each patch x (C·p² values,
channel-major, as :func:`torch.nn.functional.unfold` orders them) is coded in three steps:

1. x̃ = (x − mean of each channel of the patch) / s — the patch's DC component removed, then one scale s for all
   patches (the standard deviation of the centred fitting patches, a buffer ``scale``);
2. the code c (``atoms`` values) minimises ½‖x̃ − Dᵀc‖² + α‖c‖₁ (``transform="lasso_lars"``, the default, or
   ``lasso_cd``), or is the ``nonzero``-sparse approximation of ``omp``/``lars``, or ``threshold``: scikit-learn's
   :class:`~sklearn.decomposition.SparseCoder` with the dictionary D (``atoms`` × C·p², a buffer ``dictionary``,
   unit-norm rows);
3. the layer ``codes`` is B × ``atoms`` × rows × cols: the code of the patch at grid cell (row, col). A patch
   with no contrast (x̃ = 0) has the zero code. ``gini``, ``hoyer`` and ``lepsilon`` read it like any layer.

So the codes reconstruct the patch: x ≈ s·Dᵀc + mean. How closely depends on the penalty α, which trades
fidelity for sparsity. With ``omp`` and ``nonzero`` = C·p² the error is below 10⁻⁶ of the patch's norm (tested
on every patch); the lasso codes are tested against the lasso's optimality conditions. With the defaults (8×8
grey patches, 128 atoms, α = 1) fitted on the 102 London faces (2026-12-03), the codes leave out 25% of the
held-out patches' norm (‖DᵀC − X̃‖_F / ‖X̃‖_F = 0.25) with 4% of the codes non-zero; training writes both
numbers in ``history.parquet`` (``recon_rel_error``, ``active_fraction``).

``fluency train --arch sparse-coding`` fits D in one pass (:meth:`SparseCoding.fit`, no gradient epochs) with
scikit-learn's :class:`~sklearn.decomposition.MiniBatchDictionaryLearning` (``alpha``, ``iterations`` passes over the
patches, ``fit_algorithm``), seeded by the training ``--seed``, on ``patches_per_image`` random patches of every
training image (``patches_from="images"``), or on as many patches of ``"natural"`` images: the two photographs
scikit-learn ships (``sklearn.datasets.load_sample_images``: a Chinese temple among trees, a flower), the only
natural images available offline, preprocessed like the training images (same size, channels, centre crop). Two
photographs are a small sample of natural scenes: for a V1 dictionary of the Olshausen–Field kind, train on a
folder of natural photographs with ``--images``. Before fitting, the model codes with a seeded random dictionary
(unit-norm Gaussian atoms), as an untrained network has random weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fluency import ArchitectureSpec, Option, hookimpl
from fluency.api import EncoderOutput, FluencyEncoder, FolderSource, Preprocessing
from fluency.blocks import MAX_IMAGE_SIZE, ArchitectureConfigError

TRANSFORMS = ("lasso_lars", "lasso_cd", "lars", "omp", "threshold")
FIT_ALGORITHMS = ("lars", "cd")
SOURCES = ("images", "natural")
#: patches whose codes are computed for the fit's summary (each of the training and the held-out images)
SUMMARY_PATCHES = 2000
#: MiniBatchDictionaryLearning's mini-batch of patches
FIT_BATCH = 256


class SparseCoding(FluencyEncoder):
    """The ``sparse-coding`` model; see the module docstring."""

    default_metric_layers: ClassVar[tuple[str, ...]] = ("codes",)
    fitted_in_one_pass: ClassVar[bool] = True

    def __init__(self, image_size: int = 64, in_channels: int = 1, patch_size: int = 8, atoms: int = 128,
                 alpha: float = 1.0, transform: str = "lasso_lars", nonzero: int | None = None,
                 patches_per_image: int = 100, iterations: int = 10, fit_algorithm: str = "cd",
                 patches_from: str = "images") -> None:
        if image_size % patch_size:
            raise ArchitectureConfigError(f"sparse-coding: image_size {image_size} is not a multiple of "
                                          f"patch_size {patch_size}")
        if not alpha > 0:
            raise ArchitectureConfigError(f"sparse-coding: alpha must be positive, got {alpha}")
        dims = in_channels * patch_size ** 2
        if nonzero is not None and nonzero > min(dims, atoms):
            raise ArchitectureConfigError(f"sparse-coding: nonzero {nonzero} is more than the atoms ({atoms}) or "
                                          f"the values of a patch ({dims})")
        for value, choices, what in ((transform, TRANSFORMS, "transform"), (fit_algorithm, FIT_ALGORITHMS,
                                     "fit_algorithm"), (patches_from, SOURCES, "patches_from")):
            if value not in choices:
                raise ArchitectureConfigError(f"sparse-coding: {what} {value!r} is not one of {list(choices)}")
        super().__init__(image_size=image_size, in_channels=in_channels, patch_size=patch_size, atoms=atoms,
                         alpha=float(alpha), transform=transform, nonzero=nonzero,
                         patches_per_image=patches_per_image, iterations=iterations, fit_algorithm=fit_algorithm,
                         patches_from=patches_from)
        initial = torch.randn(atoms, dims)
        self.register_buffer("dictionary", initial / initial.norm(dim=1, keepdim=True))
        self.register_buffer("scale", torch.ones(()))
        self.codes = nn.Identity()

    def hookable_layers(self) -> dict[str, nn.Module]:
        """``codes``: B × atoms × rows × cols, the sparse code of each patch of the grid."""
        return {"codes": self.codes}

    @property
    def grid(self) -> int:
        """Patches per row (and per column) of an image."""
        return int(self.options["image_size"]) // int(self.options["patch_size"])

    def atoms_array(self) -> np.ndarray:
        """The dictionary D (atoms × C·p²) as a float64 numpy array."""
        return self.dictionary.detach().to("cpu", torch.float64).numpy()

    def centred_patches(self, x: torch.Tensor) -> np.ndarray:
        """The grid's patches of ``x`` (B×C×H×W), (B·rows·cols) × C·p², each channel's mean removed, in float64;
        image-major, then row-major over the grid."""
        p = int(self.options["patch_size"])
        cols = F.unfold(x.detach().to("cpu", torch.float64), p, stride=p)  # B × C·p² × L
        return _centre(cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy(), x.shape[1])

    def encode(self, centred: np.ndarray) -> np.ndarray:
        """The sparse codes (n × atoms, float64) of centred patches (n × C·p²): step 2 of the module docstring."""
        scaled = centred / float(self.scale)
        codes = np.zeros((len(scaled), self.dictionary.shape[0]))
        flat = ~scaled.any(axis=1)  # no contrast: the zero code (omp and lars are undefined there)
        if (~flat).any():
            from sklearn.decomposition import SparseCoder
            from sklearn.exceptions import ConvergenceWarning

            coder = SparseCoder(self.atoms_array(), **self._transform_options())
            with warnings.catch_warnings():  # lasso_cd stops after 1000 iterations; the code is still its best
                warnings.simplefilter("ignore", ConvergenceWarning)
                codes[~flat] = coder.transform(scaled[~flat])
        return codes

    def forward(self, x: torch.Tensor, sample: bool = True) -> EncoderOutput:
        """The codes of ``x``'s patches on their grid (``sample`` is ignored: coding is deterministic)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ArchitectureConfigError(f"sparse-coding: images of shape {tuple(x.shape[1:])}, expected "
                                          f"{self.input_shape}")
        flat = self.encode(self.centred_patches(x))
        codes = torch.from_numpy(flat).float().to(x.device).view(x.shape[0], self.grid, self.grid, -1)
        return EncoderOutput(self.codes(codes.permute(0, 3, 1, 2).contiguous()))

    def fit(self, batches: Iterable[torch.Tensor], held_out: Iterable[torch.Tensor], seed: int,
            status: Callable[[str], None]) -> dict[str, float]:
        """Learn the dictionary and the scale from random patches (module docstring); returns the number of
        patches, the median relative reconstruction error and the fraction of non-zero codes, on (at most
        :data:`SUMMARY_PATCHES` of) the fitting patches and, as ``val_…``, on patches of the held-out images."""
        from sklearn.decomposition import MiniBatchDictionaryLearning
        from sklearn.exceptions import ConvergenceWarning

        rng = np.random.default_rng(seed)
        patches, n_images = self._source_patches(batches, rng)
        if len(patches) < 2:
            raise ArchitectureConfigError("sparse-coding: too few patches to fit a dictionary "
                                          f"({len(patches)} from {n_images} images); raise patches_per_image")
        scale = float(patches.std())
        if not scale > 0:
            raise ArchitectureConfigError(f"sparse-coding: every patch of the {n_images} images is flat (no contrast):"
                                          " there is nothing to learn a dictionary from")
        options = self.options
        learner = MiniBatchDictionaryLearning(
            n_components=int(options["atoms"]), alpha=float(options["alpha"]), max_iter=int(options["iterations"]),
            fit_algorithm=str(options["fit_algorithm"]), batch_size=FIT_BATCH, random_state=seed,
            callback=lambda state: status(f"fitting {options['atoms']} atoms on {len(patches):,} patches: step "
                                          f"{state.get('i', 0) + 1}/{state.get('n_steps', '?')}"))
        with warnings.catch_warnings():  # cd's inner lasso steps stop at 1000 iterations, warning on each
            warnings.simplefilter("ignore", ConvergenceWarning)
            learner.fit((patches / scale).astype(np.float32))
        with torch.no_grad():
            self.dictionary.copy_(torch.from_numpy(learner.components_.astype(np.float32)))
            self.scale.fill_(scale)
        status("coding the held-out patches")
        held = [self._random_patches(b, rng) for b in held_out]
        summary = {"patches": float(len(patches)), "images": float(n_images), "steps": float(learner.n_steps_),
                   **self._quality(patches, rng)}
        if held:
            summary.update({f"val_{k}": v for k, v in self._quality(np.concatenate(held), rng).items()})
        return summary

    def _source_patches(self, batches: Iterable[torch.Tensor], rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Centred random patches to fit on (float32), and the number of training images read."""
        parts, n_images = [], 0
        for batch in batches:  # every batch is read (and counted) whatever the source
            if self.options["patches_from"] == "images":
                parts.append(self._random_patches(batch, rng))
            n_images += len(batch)
        if self.options["patches_from"] == "images":
            return (np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)), n_images
        photos = natural_images(int(self.options["image_size"]), int(self.options["in_channels"]))
        total = n_images * int(self.options["patches_per_image"])
        per_photo = [total // len(photos) + (i < total % len(photos)) for i in range(len(photos))]
        return np.concatenate([self._random_patches(photo[None], rng, n) for photo, n in zip(photos, per_photo)]), \
            n_images

    def _random_patches(self, images: torch.Tensor, rng: np.random.Generator, per_image: int | None = None
                        ) -> np.ndarray:
        """``per_image`` (default ``patches_per_image``) patches of each image at uniform random positions,
        centred (float32)."""
        n = int(self.options["patches_per_image"]) if per_image is None else per_image
        p, (b, c, h, w) = int(self.options["patch_size"]), images.shape
        arrays = images.detach().cpu().double().numpy()
        rows, cols = rng.integers(0, h - p + 1, (b, n)), rng.integers(0, w - p + 1, (b, n))
        out = np.stack([arrays[i, :, r:r + p, q:q + p].reshape(-1) for i in range(b)
                        for r, q in zip(rows[i], cols[i])]) if n and b else np.zeros((0, c * p * p))
        return _centre(out, c).astype(np.float32)

    def _quality(self, patches: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        """On (at most SUMMARY_PATCHES) ``patches``: the relative error ‖DᵀC − X̃‖_F / ‖X̃‖_F of their codes C
        (the fraction of the centred patches' norm that the codes leave out) and the fraction of non-zero codes."""
        chosen = patches[rng.permutation(len(patches))[:SUMMARY_PATCHES]].astype(np.float64)
        codes = self.encode(chosen)
        scaled = chosen / float(self.scale)
        norm = float(np.linalg.norm(scaled))
        error = float(np.linalg.norm(codes @ self.atoms_array() - scaled)) / norm if norm > 0 else 0.0
        return {"recon_rel_error": error, "active_fraction": float(np.mean(codes != 0))}

    def _transform_options(self) -> dict[str, Any]:
        options = self.options
        return {"transform_algorithm": options["transform"], "transform_alpha": float(options["alpha"]),
                "transform_n_nonzero_coefs": options["nonzero"]}


def _centre(patches: np.ndarray, channels: int) -> np.ndarray:
    """``patches`` (n × C·p², channel-major) with each channel's mean removed from each patch."""
    n = len(patches)
    split = patches.reshape(n, channels, -1)
    return (split - split.mean(axis=2, keepdims=True)).reshape(n, -1)


def natural_images(size: int, channels: int) -> list[torch.Tensor]:
    """scikit-learn's two sample photographs (``china.jpg``, ``flower.jpg``; shipped with the package, no download),
    preprocessed as fluency preprocesses training images (shorter side to ``size``, centre crop)."""
    from sklearn.datasets import load_sample_images

    files = {Path(name).stem: Path(name) for name in load_sample_images().filenames}
    source = FolderSource(next(iter(files.values())).parent, files, Preprocessing(size, channels))
    return [source.load(i) for i in range(len(files))]


def sparse_coding_options() -> dict[str, Option]:
    """The typed options of ``sparse-coding``."""
    return {
        "image_size": Option("int", 64, "input height and width (a multiple of patch_size)", minimum=2,
                             maximum=MAX_IMAGE_SIZE),
        "in_channels": Option("int", 1, "image channels (1 = grey, the Olshausen-Field setting; 3 = RGB)",
                              choices=(1, 3)),
        "patch_size": Option("int", 8, "side of the square patches (the grid is image_size / patch_size)",
                             minimum=2, maximum=64),
        "atoms": Option("int", 128, "dictionary atoms (the code of a patch has this many values)", minimum=1,
                        maximum=4096),
        "alpha": Option("float", 1.0, "sparsity penalty α of the L1 term, in units of the scaled patches "
                        "(fit and lasso/threshold codes)", minimum=0.0, maximum=1e6),
        "transform": Option("str", "lasso_lars", "how codes are computed (scikit-learn SparseCoder)",
                            choices=TRANSFORMS),
        "nonzero": Option("int", None, "non-zero codes per patch for omp and lars (default: a tenth of the "
                          "patch's values)", minimum=1),
        "patches_per_image": Option("int", 100, "random patches drawn from each training image for the fit",
                                    minimum=1, maximum=100_000),
        "iterations": Option("int", 10, "passes over the patches while fitting (MiniBatchDictionaryLearning "
                             "max_iter; it may stop earlier once converged)", minimum=1, maximum=10_000),
        "fit_algorithm": Option("str", "cd", "lasso solver of the fit: cd (coordinate descent; 3x faster than "
                                "lars on 5,000 8x8 patches here) or lars", choices=FIT_ALGORITHMS),
        "patches_from": Option("str", "images", "fit on the training images, or on scikit-learn's two sample "
                               "photographs (natural)", choices=SOURCES),
    }


@hookimpl
def fluency_register_architectures() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(
            name="sparse-coding",
            factory=SparseCoding,
            description="Sparse-coding dictionary of image patches (Olshausen-Field, scikit-learn): the codes "
                        "of each patch, an encoder-only V1 baseline fitted in one pass.",
            options=sparse_coding_options(),
        )
    ]
