"""``fluency store import``: activations saved by other tools become a fluency activation store.

Accepted sources, each holding one N×… array per layer (N = the number of ids):

- a folder with one sub-folder per layer holding ``features.npy``: what thingsvision's
  ``save_features(features, out_path, file_format="npy")`` writes when called once per module
  (the sub-folder name is the layer name); a bare ``features.npy`` in the folder itself is one
  layer named after the folder;
- an ``.npz`` file (``np.savez``): one array per key;
- an HDF5 file (``.h5``/``.hdf5``, needs ``h5py``): one dataset per layer, nested names joined by ``.``.

``IDS`` is a text file with one image id per line in row order (thingsvision's ``file_names.txt``
lists file names: their stems are fine ids). The arrays are read in row blocks (``.npy`` through a
memory map, HDF5 by slices), so memory stays bounded; an ``.npz`` member is read whole. The store's
provenance says ``source: imported`` with the source's sha256; its model description names every
imported layer as a default metric layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from fluency.core.errors import FluencyError, InputError, error_text
from fluency.core.hashing import file_sha256
from fluency.core.plugin.metric import ModelDescription
from fluency.core.progress import progress_bar
from fluency.core.run.ledger import results
from fluency.core.run.lock import FolderLock, refuse_if_busy
from fluency.core.run.store import ActivationStoreWriter
from fluency.core.version import __version__

FEATURES = "features.npy"
HDF5 = (".h5", ".hdf5")
_ROWS = 256


def read_ids(path: str | Path) -> list[str]:
    """Image ids, one per line (blank lines and surrounding spaces ignored); duplicates are an error."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--ids {path}: cannot read it ({exc})") from None
    ids = [line.strip() for line in lines if line.strip()]
    seen: dict[str, int] = {}
    for number, image_id in enumerate(ids, 1):
        if image_id in seen:
            raise InputError(f"--ids {path}: id {image_id!r} appears twice (lines {seen[image_id]} and {number})")
        seen[image_id] = number
    if not ids:
        raise InputError(f"--ids {path}: no ids")
    return ids


def _layer_files(folder: Path) -> dict[str, Path]:
    found = {p.parent.name: p for p in sorted(folder.glob(f"*/{FEATURES}"))}
    if not found and (folder / FEATURES).exists():
        found = {folder.name: folder / FEATURES}
    if not found:
        raise InputError(f"{folder}: no layer sub-folders with {FEATURES} (the layout thingsvision's save_features "
                         "writes, one sub-folder per layer)")
    return found


@contextmanager
def open_arrays(source: Path) -> Iterator[dict[str, Any]]:
    """``{layer: array-like}`` of a source; ``.npy`` files are memory-mapped, HDF5 datasets read lazily."""
    with ExitStack() as stack:
        if source.is_dir():
            arrays: dict[str, Any] = {}
            for layer, file in _layer_files(source).items():
                try:
                    arrays[layer] = np.load(file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise InputError(f"{file}: not a readable .npy array ({exc})") from None
            yield arrays
        elif source.suffix.lower() == ".npz":
            try:
                npz = stack.enter_context(np.load(source, allow_pickle=False))
                members = {key: npz[key] for key in npz.files}  # each member is read whole here
            except Exception as exc:  # numpy raises OSError, ValueError, BadZipFile, EOFError... for bad files
                raise InputError(f"{source}: not a readable .npz file ({error_text(exc)})") from None
            yield members
        elif source.suffix.lower() in HDF5:
            try:
                import h5py
            except ImportError:
                raise FluencyError(f"{source}: reading HDF5 needs h5py: pip install h5py") from None
            try:
                h5 = stack.enter_context(h5py.File(source, "r"))
            except OSError as exc:
                raise InputError(f"{source}: not a readable HDF5 file ({exc})") from None
            datasets: dict[str, Any] = {}

            def collect(name: str, obj: Any) -> None:  # visititems stops at the first non-None return
                if isinstance(obj, h5py.Dataset):
                    datasets[name.replace("/", ".")] = obj

            h5.visititems(collect)
            yield datasets
        elif source.exists():
            raise InputError(f"{source}: import a folder of <layer>/{FEATURES}, an .npz or an HDF5 file")
        else:
            raise InputError(f"{source}: no such file or folder")


def source_sha256(source: Path) -> str:
    """sha256 of a file, or of a folder's layer files (their relative names and sha256s, sorted)."""
    if source.is_file():
        return file_sha256(source)
    digest = hashlib.sha256()
    for layer, file in sorted(_layer_files(source).items()):
        digest.update(f"{file.relative_to(source).as_posix()}\t{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _check(arrays: dict[str, Any], layers: Sequence[str], n: int, source: Path) -> None:
    for layer in layers:
        array = arrays[layer]
        if array.ndim < 2 or array.shape[0] != n:
            raise InputError(f"{source}: layer {layer!r} has shape {tuple(array.shape)}; expected {n} rows "
                             f"(one per id) of at least one value each")
        if np.dtype(array.dtype).kind not in "fiu":
            raise InputError(f"{source}: layer {layer!r} holds {array.dtype} values, not numbers")


def import_store(source: str | Path, ids: str | Path, out: str | Path, *, layers: Sequence[str] | None = None,
                 dtype: str = "float32", architecture: str = "imported", batch_rows: int = _ROWS,
                 console: Console | None = None) -> Path:
    """Write the activations of ``source`` (see the module docstring) as a store at ``out``; returns ``out``."""
    source, out = Path(source), Path(out)
    refuse_if_busy(out)
    if out.exists() and (not out.is_dir() or results(out)):
        raise FluencyError(f"--out {out}: exists and is not an empty folder; choose another")
    image_ids = read_ids(ids)
    with open_arrays(source) as arrays:
        names = list(layers) if layers else sorted(arrays)
        if not names:
            raise InputError(f"{source}: holds no arrays to import")
        unknown = [name for name in names if name not in arrays]
        if unknown:
            raise InputError(f"{source}: no layer(s) {unknown}; it has {sorted(arrays)}")
        _check(arrays, names, len(image_ids), source)
        provenance = {"source": "imported", "imported_from": str(source.resolve()),
                      "source_sha256": source_sha256(source), "ids_file": str(Path(ids).resolve()),
                      "ids_sha256": file_sha256(ids),
                      "fluency_version": __version__}
        model = ModelDescription(architecture, tuple(names))
        out.mkdir(parents=True, exist_ok=True)
        with FolderLock(out, "fluency store import", console), \
                ActivationStoreWriter(out, dtype=dtype, provenance=provenance, model=model) as writer, \
                progress_bar(console) as bars:
            task = bars.add_task("import", total=len(names) * len(image_ids), status="")
            for name in names:
                bars.update(task, status=name)
                for start in range(0, len(image_ids), batch_rows):
                    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: caught below
                        block = np.asarray(arrays[name][start:start + batch_rows]).astype(np.float32, copy=False)
                    if not np.isfinite(block).all():
                        bad = start + int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))[0])
                        raise InputError(f"{source}: layer {name!r} has NaN/Inf values, or values beyond float32's "
                                         f"range (row {bad}, id {image_ids[bad]!r})")
                    writer.write(name, image_ids[start:start + batch_rows], block)
                    bars.advance(task, len(block))
    for note in writer.notes:  # --dtype float16 and values beyond it: that layer went to float32
        bars.console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    return out
