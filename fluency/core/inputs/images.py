"""Finding, decoding and preprocessing the images a run measures.

Every image becomes a float32 ``C×H×W`` tensor in [0, 1] by one explicit recipe
(:class:`Preprocessing`): EXIF orientation applied; transparency composited onto
white; 16-bit images scaled by 65535 (not clipped at 255); grey replicated to RGB
or RGB reduced to luminance (ITU-R 601) as the model needs; the shorter side
scaled to ``size`` (Lanczos, antialiased) and the centre cropped to a square, or,
with ``size=None`` ("native"), no resampling at all: the image at its own size.
Conversions are done in floating point so no mode is silently truncated to 8 bits.

A hostile file cannot exhaust memory or hang a run: only regular files are opened
(a named pipe, socket or device named ``x.png`` is skipped and reported, never
opened; symbolic links are followed, and what they point to must be a regular
file); an image is refused from its header, before any pixel is decoded, if it has
more than :data:`MAX_PIXELS` pixels; and the crop is resampled straight from the
source pixels (never through a full-size scaled copy) one band at a time, so a
1 × 100,000-pixel strip costs no more than its own pixels. Decoding needs at most
:data:`BYTES_PER_PIXEL` bytes per source pixel, whatever the aspect ratio, and the
threads decode at most :data:`MAX_PIXELS` pixels at once: about 2.5 GB in all.

An :class:`ImageSource` gives the images of a run by index together with their
ids and a fingerprint of the stimuli that goes into provenance records.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from fluency.core.errors import InputError, error_text
from fluency.core.hashing import file_sha256
from fluency.core.inputs.paths import PathList

#: file extensions read as images (compared in lower case)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: the ``size`` of preprocessing that keeps images at their own size, as provenance names it
NATIVE = "native"
#: the EXIF tag of orientation; values 5–8 turn the image a quarter (width and height swap)
_EXIF_ORIENTATION = 0x0112
#: the only resizing recipe so far; named in provenance so that a later one can be told apart
T = TypeVar("T")
R = TypeVar("R")

RESIZE = "shorter-side+center-crop"
#: resize recipes: keep the aspect ratio and crop the centre, or stretch to a square
RESIZES = (RESIZE, "stretch")

# ITU-R BT.601 luma weights, as PIL's "L" conversion
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PREFETCH_WORKERS = 4

#: the most pixels (width × height) an image may have: Pillow's own decompression-bomb threshold
#: (``PIL.Image.MAX_IMAGE_PIXELS``, above which Pillow warns, and refuses at twice as many), about
#: 9459 × 9459, beyond any stimulus but a camera's raw panorama. Checked from the header, before decoding.
MAX_PIXELS = 89_478_485
#: peak bytes per source pixel while an image is decoded and preprocessed (the decoded pixels, then one
#: float32 band at a time with alpha; measured at most 24, for 32-bit integer and RGBA-to-grey images).
#: Threads decode at most :data:`MAX_PIXELS` source pixels at once between them, so decoding holds at
#: most ``MAX_PIXELS × BYTES_PER_PIXEL`` ≈ 2.5 GB, whatever the images and the number of threads.
BYTES_PER_PIXEL = 28

_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def is_image(path: Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def not_regular(path: Path) -> str | None:
    """Why ``path`` is not a regular file (``"a named pipe"``, ...), or None if it is one; never opens it.

    Symbolic links are followed: a link to a regular file is one, a link to a pipe is not.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "no such file"
    except OSError as exc:
        return f"cannot be examined ({error_text(exc)})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def skipped_reason(kind: str) -> str:
    """How a skipped non-regular file is reported (among the unreadable images)."""
    return f"{kind}, not a regular file: skipped, never opened"


def scan_images(root: str | Path) -> tuple[list[Path], dict[Path, str]]:
    """``(images, skipped)`` under ``root``: the files :func:`find_images` returns, and the other entries with
    an image's name (named pipes, sockets, devices, broken links) with why they are skipped, never opened."""
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
    images, skipped = [], {}
    for _, path in sorted(found):
        kind = not_regular(path)
        if kind is None:
            images.append(path)
        else:
            skipped[path] = skipped_reason(kind)
    return images, skipped


def find_images(root: str | Path) -> list[Path]:
    """The images under ``root``, recursively, sorted by relative posix path.

    Hidden files and folders (names starting with '.', e.g. macOS ``._X001.jpg``)
    are skipped. Symlinked folders are followed once each; symlinked files are
    followed wherever they point (they are only read). Only regular files are
    returned: a named pipe, socket or device with an image's name is left out
    unopened (reading a pipe would hang), as is a broken link. The paths returned
    are ``root / relative_path`` so that ``p.relative_to(root)`` works. No image
    is an :class:`InputError`.
    """
    images, skipped = scan_images(root)
    if not images:
        raise InputError(f"no readable images in {root}: all {len(skipped)} cannot be read, e.g. "
                         + "; ".join(f"{path} ({why})" for path, why in list(skipped.items())[:3]))
    return images


@dataclass(frozen=True)
class Preprocessing:
    """How files become model input: ``channels`` (1 or 3) × ``size`` × ``size`` floats in [0, 1]; ``size``
    None keeps every image at its own size (for models that take any size; a batch needs one size)."""

    size: int | None
    channels: int = 3
    resize: str = RESIZE

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"image size must be positive, not {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"images have 1 or 3 channels, not {self.channels}")
        if self.resize not in RESIZES:
            raise ValueError(f"unknown resize recipe {self.resize!r}; use one of {list(RESIZES)}")

    def as_dict(self) -> dict[str, Any]:
        """The recipe, JSON-ready, with the fixed choices spelled out for provenance."""
        if self.size is None:
            return {**asdict(self), "size": NATIVE, "resize": None, "range": [0.0, 1.0],
                    "alpha": "composited onto white", "exif_orientation": True,
                    "luminance": "ITU-R 601" if self.channels == 1 else None}
        return {**asdict(self), "resample": "lanczos", "range": [0.0, 1.0], "alpha": "composited onto white",
                "exif_orientation": True, "luminance": "ITU-R 601" if self.channels == 1 else None}


def _float_mode(img: Image.Image) -> Image.Image:
    """``img`` in a mode whose bands :func:`_band` reads: L, LA, RGB, RGBA, I, I;16* or F (converted if need be)."""
    mode = img.mode
    if mode in ("P", "PA"):
        return img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if mode in ("L", "RGB") and "transparency" in img.info:  # a colour key instead of an alpha channel
        return img.convert("LA" if mode == "L" else "RGBA")
    if mode in ("La", "RGBa"):  # premultiplied alpha
        return img.convert(mode.upper())
    if mode == "1" or not (mode in ("L", "LA", "RGB", "RGBA", "I", "F") or mode.startswith("I;16")):
        return img.convert("L" if mode == "1" else "RGB")  # CMYK, YCbCr, LAB, HSV, RGBX…
    return img


def _band(img: Image.Image, index: int) -> np.ndarray:
    """Band ``index`` of an image in a :func:`_float_mode` mode as float32 H×W in [0, 1].

    One band at a time, so that the float copies of an image never all exist at once.
    """
    mode = img.mode
    arr = np.asarray(img if len(img.getbands()) == 1 else img.getchannel(index))
    if mode.startswith("I;16"):
        out = arr.astype(np.float32)
        out /= 65535.0
        return out
    if mode == "I":
        # 16-bit PNG/TIFF may decode to "I"; wider integers are scaled by their type's range
        top = 65535.0 if arr.size == 0 or int(arr.max()) <= 65535 else float(2**31 - 1)
        return np.clip(arr.astype(np.float64) / top, 0.0, 1.0).astype(np.float32)
    if mode == "F":
        return np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)  # float images are taken as [0, 1]
    out = arr.astype(np.float32)
    out /= 255.0
    return out


def _planes(img: Image.Image, size: int | None, channels: int, resize: str) -> list[np.ndarray]:
    """The ``size×size`` float planes of a decoded image (``size`` None: at its own size): alpha composited onto
    white, grey or luminance as ``channels`` asks, each colour band converted, composited and resized before the
    next is read."""
    img = _float_mode(img)
    n_bands = len(img.getbands())
    alpha = _band(img, n_bands - 1) if img.mode in ("LA", "RGBA") else None
    background = None if alpha is None else 1.0 - alpha
    n_colour = n_bands - (alpha is not None)

    def colour(index: int) -> np.ndarray:
        band = _band(img, index)
        if alpha is not None:
            band *= alpha
            band += background
        return band

    if channels == 1 and n_colour == 3:
        grey = colour(0)
        grey *= _LUMA[0]
        for index in (1, 2):
            band = colour(index)
            band *= _LUMA[index]
            grey += band
            del band
        return [_resize_crop(grey, size, resize)]
    planes = [_resize_crop(colour(index), size, resize) for index in range(n_colour)]
    return planes * 3 if channels == 3 and n_colour == 1 else planes


def _resize_crop(channel: np.ndarray, size: int | None, resize: str = RESIZE) -> np.ndarray:
    """Scale the shorter side of one H×W float channel to ``size`` and crop the centre square
    (or, with ``resize="stretch"``, scale both sides to ``size``); ``size`` None leaves it as it is."""
    if size is None or channel.shape == (size, size):  # Pillow would return a copy: the same pixels, slower
        return channel
    if resize == "stretch":
        img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
        return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))
    # the crop of the scaled image, resampled straight from its source box: the same pixels (to float
    # rounding) as scaling the whole image and cropping it, without the scaled copy, which for a thin
    # strip is enormous (1 × 20,000 pixels scaled to a shorter side of 64: 82 million pixels per channel)
    h, w = channel.shape
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=box))


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading; anything but a regular file (checked before opening, and after, in case
    it was swapped meanwhile: opened without blocking, so a pipe cannot hang) is an :class:`InputError`."""
    kind = not_regular(path)
    if kind is not None:
        raise InputError(f"cannot read image {path}: it is {kind}, not a regular file")
    extra = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    file = open(path, "rb", opener=lambda name, flags: os.open(name, flags | extra))  # noqa: SIM115
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise InputError(f"cannot read image {path}: it is not a regular file")
    return file


_decoding = threading.Condition()
_decoding_pixels = 0


@contextmanager
def _pixel_budget(pixels: int) -> Iterator[None]:
    """Wait until the images other threads are decoding leave room for ``pixels`` (≤ :data:`MAX_PIXELS`) more,
    and hold them while the block runs: the memory bound of decoding is one largest image's, not ``workers`` of them."""
    global _decoding_pixels
    with _decoding:
        _decoding.wait_for(lambda: _decoding_pixels == 0 or _decoding_pixels + pixels <= MAX_PIXELS)
        _decoding_pixels += pixels
    try:
        yield
    finally:
        with _decoding:
            _decoding_pixels -= pixels
            _decoding.notify_all()


def _too_large(img: Image.Image) -> str | None:
    """Why an opened (not yet decoded) image is refused: more than :data:`MAX_PIXELS` pixels; else None."""
    if img.width * img.height <= MAX_PIXELS:
        return None
    return (f"it has {img.width}×{img.height} = {img.width * img.height:,} pixels, more than fluency decodes "
            f"({MAX_PIXELS:,}, Pillow's decompression-bomb limit); downscale it first")


def load_image(path: str | Path, size: int | None, channels: int = 3, resize: str = RESIZE) -> torch.Tensor:
    """One image file as a float32 ``channels×size×size`` tensor in [0, 1] (see the module docstring);
    ``size`` None: ``channels×H×W``, the image at its own size (no resampling, no crop).

    A missing, corrupt, truncated or unrecognised file, one that is not a regular file,
    or one of more than :data:`MAX_PIXELS` pixels raises :class:`InputError` naming
    the file and the reason.
    """
    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels, not {channels}")
    path = Path(path)
    try:
        with _open_regular(path) as file, Image.open(file) as img:
            if (why := _too_large(img)) is not None:
                raise InputError(f"cannot read image {path}: {why}")
            if img.width == 0 or img.height == 0:
                raise InputError(f"cannot read image {path}: it is empty ({img.width}×{img.height} pixels)")
            with _pixel_budget(img.width * img.height):
                img.load()  # decode now, so that truncation is caught here
                ImageOps.exif_transpose(img, in_place=True)
                planes = _planes(img, size, channels, resize)
    except InputError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, EOFError… for bad files
        raise InputError(f"cannot read image {path}: {error_text(exc)}") from exc
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
    256×256 JPEG, an eighth of what :func:`load_image` costs. A file that is not a
    regular file is never opened, and one of more than :data:`MAX_PIXELS` pixels never
    decoded.
    """
    path = Path(path)
    kind = not_regular(path)
    if kind is not None:
        return skipped_reason(kind)
    try:
        with _open_regular(path) as file, Image.open(file) as img:
            if (why := _too_large(img)) is not None:
                return why
            img.verify()
        with _open_regular(path) as file, Image.open(file) as img:
            if (why := _too_large(img)) is not None:
                return why
            with _pixel_budget(img.width * img.height):
                img.load()
            img.getexif()
            if img.width == 0 or img.height == 0:
                return f"it is empty ({img.width}×{img.height} pixels)"
    except Exception as exc:  # as in load_image: PIL raises many types for bad files
        return error_text(exc)
    return None


def map_in_windows(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Sequence[T], window: int = 256) -> list[R]:
    """``[fn(x) for x in items]`` on ``pool``, ``window`` items in flight at a time: ``pool.map`` over all of
    them creates every future up front, and the process kept ~0.9 KB per image of that freed memory
    (measured on 10,000 and 30,000 images; issue 16, memory of a 100,000-image run)."""
    out: list[R] = []
    for start in range(0, len(items), window):
        out += pool.map(fn, items[start:start + window])
    return out


def find_unreadable(paths: Sequence[Path], workers: int = _PREFETCH_WORKERS) -> dict[Path, str]:
    """The files among ``paths`` that cannot be decoded, with the decoder's reason, in the given order."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fluency-check") as pool:
        problems = map_in_windows(pool, image_problem, paths)
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

    def size_of(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index`` as :meth:`load` gives it (subclasses answer without decoding)."""
        return tuple(self.load(index).shape[1:])  # type: ignore[return-value]

    def check_one_size(self) -> tuple[int, int] | None:
        """The one ``(height, width)`` of every image (None for no images); images of two sizes are an
        :class:`InputError` naming one of each. Images kept at their own size (``size=None``) must be of
        one size to be measured in batches."""
        if not len(self):
            return None
        first = self.size_of(0)
        for index in range(1, len(self)):
            size = self.size_of(index)
            if size != first:
                raise InputError(f"images of different sizes: {self.name_of(0)} is {first[1]}×{first[0]} but "
                                 f"{self.name_of(index)} is {size[1]}×{size[0]}; a model at native size measures "
                                 "images of one size (resize them, or give the model an integer size)")
        return first

    def name_of(self, index: int) -> str:
        """How messages name image ``index``."""
        return self.ids[index]


class FolderSource(ImageSource):
    """Image files under ``root``; ``files`` maps ids to paths in the order to load them (``paths``: a
    sequence of :class:`~pathlib.Path`)."""

    def __init__(self, root: str | Path, files: Mapping[str, str | Path], preprocessing: Preprocessing) -> None:
        self.root = Path(root)
        self.ids = list(files)
        self.paths = PathList(files.values())
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

    def size_of(self, index: int) -> tuple[int, int]:
        """From the file's header and EXIF orientation, without decoding; a square of ``size`` when resized."""
        if self.preprocessing.size is not None:
            return (self.preprocessing.size, self.preprocessing.size)
        path = self.paths[index]
        try:
            with _open_regular(path) as file, Image.open(file) as img:
                turned = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
                return (img.width, img.height) if turned else (img.height, img.width)
        except InputError:
            raise
        except Exception as exc:  # as in load_image
            raise InputError(f"cannot read image {path}: {error_text(exc)}") from exc

    def name_of(self, index: int) -> str:
        return str(self.paths[index])

    def fingerprint(self) -> str:
        """sha256 over the sorted ``(id, relative path, sha256 of the file)``; computed once."""
        if self._fingerprint is None:
            with ThreadPoolExecutor(_PREFETCH_WORKERS) as pool:
                digests = map_in_windows(pool, _sha256_file, self.paths)
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

    def size_of(self, index: int) -> tuple[int, int]:
        return (int(self.images.shape[2]), int(self.images.shape[3]))


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


def subset(source: ImageSource, ids: Sequence[str]) -> ImageSource:
    """The images ``ids`` of ``source``, in that order (a shard of a stimulus set); its fingerprint covers those
    images only."""
    if list(ids) == source.ids:
        return source
    index = {image_id: i for i, image_id in enumerate(source.ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputError(f"no image with id(s) {missing[:5]} in the stimuli")
    if isinstance(source, FolderSource):
        return FolderSource(source.root, {i: source.paths[index[i]] for i in ids}, source.preprocessing)
    if isinstance(source, TensorSource):
        rows = torch.tensor([index[i] for i in ids], dtype=torch.long)
        return TensorSource(list(ids), source.images[rows], source.description)
    raise InputError(f"cannot take a subset of a {type(source).__name__}")
