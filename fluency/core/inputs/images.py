"""Finding, decoding and preprocessing the images a run measures.

Every image becomes a float32 ``C×H×W`` tensor in [0, 1] by one explicit recipe
(:class:`Preprocessing`): EXIF orientation applied; transparency composited onto
white; 16-bit images scaled by 65535 (not clipped at 255); grey replicated to RGB
or RGB reduced to luminance (ITU-R 601) as the model needs; the shorter side
scaled to ``size`` (Lanczos, antialiased) and the centre cropped to a square.
Conversions are done in floating point so no mode is silently truncated to 8 bits.

An :class:`ImageSource` gives the images of a run by index together with their
ids and a fingerprint of the stimuli that goes into provenance records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from fluency.core.errors import InputError, error_text
from fluency.core.hashing import file_sha256

#: file extensions read as images (compared in lower case)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: the only resizing recipe so far; named in provenance so that a later one can be told apart
RESIZE = "shorter-side+center-crop"
#: resize recipes: keep the aspect ratio and crop the centre, or stretch to a square
RESIZES = (RESIZE, "stretch")

# ITU-R BT.601 luma weights, as PIL's "L" conversion
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PREFETCH_WORKERS = 4


def is_image(path: Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: str | Path) -> list[Path]:
    """The images under ``root``, recursively, sorted by relative posix path.

    Hidden files and folders (names starting with '.', e.g. macOS ``._X001.jpg``)
    are skipped. Symlinked folders are followed once each. The paths returned are
    ``root / relative_path`` so that ``p.relative_to(root)`` works.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"image folder {root} is not a folder")
    found: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for name in filenames:
            path = base / name
            if not name.startswith(".") and is_image(path):
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise InputError(f"no images in {root}: looked (recursively, skipping hidden files) for "
                         f"{', '.join(IMAGE_EXTENSIONS)} in any case")
    return [path for _, path in sorted(found)]


@dataclass(frozen=True)
class Preprocessing:
    """How files become model input: ``channels`` (1 or 3) × ``size`` × ``size`` floats in [0, 1]."""

    size: int
    channels: int = 3
    resize: str = RESIZE

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"image size must be positive, not {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"images have 1 or 3 channels, not {self.channels}")
        if self.resize not in RESIZES:
            raise ValueError(f"unknown resize recipe {self.resize!r}; use one of {list(RESIZES)}")

    def as_dict(self) -> dict[str, Any]:
        """The recipe, JSON-ready, with the fixed choices spelled out for provenance."""
        return {**asdict(self), "resample": "lanczos", "range": [0.0, 1.0], "alpha": "composited onto white",
                "exif_orientation": True, "luminance": "ITU-R 601" if self.channels == 1 else None}


def _to_array(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """``(colour H×W×C in [0,1] with C 1 or 3, alpha H×W in [0,1] or None)`` for any PIL mode."""
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in img.info:  # a colour key instead of an alpha channel
        img = img.convert("LA" if mode == "L" else "RGBA")
    elif mode in ("La", "RGBa"):  # premultiplied alpha
        img = img.convert(mode.upper())
    elif mode == "1" or not (mode in ("L", "LA", "RGB", "RGBA", "I", "F") or mode.startswith("I;16")):
        img = img.convert("L" if mode == "1" else "RGB")  # CMYK, YCbCr, LAB, HSV, RGBX…
    mode = img.mode
    arr = np.asarray(img)
    if mode.startswith("I;16"):
        colour = arr.astype(np.float32) / 65535.0
    elif mode == "I":
        # 16-bit PNG/TIFF may decode to "I"; wider integers are scaled by their type's range
        top = 65535.0 if arr.size == 0 or int(arr.max()) <= 65535 else float(2**31 - 1)
        colour = np.clip(arr.astype(np.float64) / top, 0.0, 1.0).astype(np.float32)
    elif mode == "F":
        colour = np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)  # float images are taken as [0, 1]
    else:
        colour = arr.astype(np.float32) / 255.0
    if colour.ndim == 2:
        colour = colour[..., None]
    if mode in ("LA", "RGBA"):
        return colour[..., :-1], colour[..., -1]
    return colour, None


def _resize_crop(channel: np.ndarray, size: int, resize: str = RESIZE) -> np.ndarray:
    """Scale the shorter side of one H×W float channel to ``size`` and crop the centre square
    (or, with ``resize="stretch"``, scale both sides to ``size``)."""
    if resize == "stretch":
        img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
        return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))
    h, w = channel.shape
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    resized = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(
        (new_w, new_h), Image.Resampling.LANCZOS)
    return np.asarray(resized)[top:top + size, left:left + size]


def load_image(path: str | Path, size: int, channels: int = 3, resize: str = RESIZE) -> torch.Tensor:
    """One image file as a float32 ``channels×size×size`` tensor in [0, 1] (see the module docstring).

    A missing, corrupt, truncated or unrecognised file raises :class:`InputError`
    naming the file and the decoder's complaint.
    """
    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels, not {channels}")
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that truncation is caught here
            img = ImageOps.exif_transpose(img)
            colour, alpha = _to_array(img)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, EOFError… for bad files
        raise InputError(f"cannot read image {path}: {error_text(exc)}") from exc
    if colour.shape[0] == 0 or colour.shape[1] == 0:
        raise InputError(f"cannot read image {path}: it is empty ({colour.shape[1]}×{colour.shape[0]} pixels)")
    if alpha is not None:
        colour = colour * alpha[..., None] + (1.0 - alpha[..., None])
    if channels == 1 and colour.shape[2] == 3:
        colour = (colour @ _LUMA)[..., None]
    planes = [_resize_crop(colour[..., c], size, resize) for c in range(colour.shape[2])]
    if channels == 3 and len(planes) == 1:
        planes = planes * 3
    out = np.clip(np.stack(planes), 0.0, 1.0)  # Lanczos overshoots a little at edges
    return torch.from_numpy(out.astype(np.float32, copy=False))


def _sha256_file(path: Path) -> str:
    """:func:`fluency.core.hashing.file_sha256`, an unreadable file an :class:`InputError` naming it."""
    try:
        return file_sha256(path)
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def image_problem(path: str | Path) -> str | None:
    """Why the file at ``path`` cannot be decoded (``"Type: message"``, one line), or None if it decodes.

    ``PIL.Image.verify`` checks the file's structure, then a full decode catches
    truncated pixel data (verify alone misses it for JPEG). About 0.7 ms per
    256×256 JPEG, an eighth of what :func:`load_image` costs.
    """
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            img.getexif()
            if img.width == 0 or img.height == 0:
                return f"it is empty ({img.width}×{img.height} pixels)"
    except Exception as exc:  # as in load_image: PIL raises many types for bad files
        return error_text(exc)
    return None


def find_unreadable(paths: Sequence[Path], workers: int = _PREFETCH_WORKERS) -> dict[Path, str]:
    """The files among ``paths`` that cannot be decoded, with the decoder's reason, in the given order."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fluency-check") as pool:
        problems = list(pool.map(image_problem, paths))
    return {Path(p): why for p, why in zip(paths, problems) if why is not None}


class ImageSource:
    """Images by index, with their ids; what a run measures and what training reads.

    Subclasses set ``ids`` and implement :meth:`load`, :meth:`fingerprint` and :meth:`describe`.
    """

    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` as a float32 ``C×H×W`` tensor in [0, 1]."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A sha256 hex digest that changes whenever an id or an image's content changes."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Where the images come from and how they are preprocessed, JSON-ready."""
        raise NotImplementedError


class FolderSource(ImageSource):
    """Image files under ``root``; ``files`` maps ids to paths in the order to load them."""

    def __init__(self, root: str | Path, files: Mapping[str, Path], preprocessing: Preprocessing) -> None:
        self.root = Path(root)
        self.ids = list(files)
        self.paths = [Path(p) for p in files.values()]
        self.preprocessing = preprocessing
        self._fingerprint: str | None = None

    def relpath(self, index: int) -> str:
        """The posix path of image ``index`` relative to ``root`` (absolute if outside it)."""
        path = self.paths[index]
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.resolve().as_posix()

    def load(self, index: int) -> torch.Tensor:
        pre = self.preprocessing
        return load_image(self.paths[index], pre.size, pre.channels, pre.resize)

    def fingerprint(self) -> str:
        """sha256 over the sorted ``(id, relative path, sha256 of the file)``; computed once."""
        if self._fingerprint is None:
            with ThreadPoolExecutor(_PREFETCH_WORKERS) as pool:
                digests = list(pool.map(_sha256_file, self.paths))
            h = hashlib.sha256()
            for row in sorted(zip(self.ids, (self.relpath(i) for i in range(len(self))), digests)):
                h.update(json.dumps(row).encode() + b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "root": str(self.root.resolve()), "n_images": len(self),
                **self.preprocessing.as_dict()}


class TensorSource(ImageSource):
    """In-memory images, ``N×C×H×W`` floats in [0, 1], e.g. the embedded default stimuli."""

    def __init__(self, ids: Sequence[str], images: torch.Tensor, description: Mapping[str, Any]) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be N×C×H×W, not of shape {tuple(images.shape)}")
        if len(ids) != images.shape[0]:
            raise ValueError(f"{len(ids)} ids for {images.shape[0]} images")
        if len(set(ids)) != len(ids):
            raise ValueError("image ids must be unique")
        self.ids = [str(i) for i in ids]
        self.images = images.detach().to("cpu", torch.float32).contiguous()
        self.description = dict(description)

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def fingerprint(self) -> str:
        """sha256 of the ids, the shape and the float32 bytes of the images."""
        h = hashlib.sha256()
        h.update(json.dumps({"ids": self.ids, "shape": list(self.images.shape)}).encode())
        h.update(self.images.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {**self.description, "shape": list(self.images.shape)}


def iter_batches(source: ImageSource, batch_size: int, workers: int = _PREFETCH_WORKERS,
                 on_error: Callable[[int, InputError], None] | None = None,
                 ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(ids, B×C×H×W images)`` in the source's order, decoding the next batch while this one is used.

    Decoding runs on a few threads (PIL releases the GIL); at most two batches are
    in memory. An unreadable image raises its :class:`InputError` (naming the
    file) when its batch is reached; with ``on_error`` it is left out of its batch
    and ``on_error(index, error)`` is called instead (which may raise). A batch
    left empty is not yielded.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, not {batch_size}")
    n = len(source)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fluency-images")

    def submit(start: int) -> list[Future[torch.Tensor]]:
        return [pool.submit(source.load, i) for i in range(start, min(start + batch_size, n))]

    pending = submit(0) if n else []
    try:
        for start in range(0, n, batch_size):
            current, pending = pending, submit(start + batch_size) if start + batch_size < n else []
            ids, images = [], []
            for index, future in enumerate(current, start):
                try:
                    images.append(future.result())
                except InputError as exc:
                    if on_error is None:
                        raise
                    on_error(index, exc)
                    continue
                ids.append(source.ids[index])
            if images:
                yield ids, torch.stack(images)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
