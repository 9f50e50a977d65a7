"""Reliability of inputs (issue 12, points 2 and 4): no hang, no memory blow-up and no traceback from a file.

Images: decoding is bounded in pixels before any array is made and in memory whatever the aspect ratio;
named pipes, sockets and broken links in an image folder are skipped and reported, never opened.
Checkpoints: a file that is not one, a field that is missing or malformed, absurd architecture sizes and
a checkpoint without training state for ``--resume`` are each one CheckpointError naming file and field.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fluency.core.errors import CheckpointError, FluencyError, InputError
from fluency.core.inputs.images import Preprocessing, find_images, load_image
from fluency.core.inputs.stimuli import from_folder
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, read_checkpoint, save_checkpoint

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA and ru_maxrss in KiB are Linux's")


def make_image(path: Path, size: tuple[int, int] = (12, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 10)).save(path)
    return path


def png_of_zeros(path: Path, width: int, height: int) -> Path:
    """A greyscale PNG of ``width × height`` black pixels, compressed in chunks (a few hundred KB at most)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    rows_per_block = max(1, 4_000_000 // len(row))
    data = b"".join(packer.compress(row * min(rows_per_block, height - y)) for y in range(0, height, rows_per_block))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data + packer.flush())
                     + chunk(b"IEND", b""))
    return path


_DECODE = """
import json, resource, sys
from fluency.core.inputs.images import load_image
from fluency.core.errors import InputError
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
data_kib = int(status["VmData"].split()[0])
limit = (data_kib + 768 * 1024) * 1024  # 768 MiB above what the imports use: today's code needs gigabytes
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = []
for path in sys.argv[1:]:
    try:
        results.append({"shape": list(load_image(path, 64).shape)})
    except InputError as exc:
        results.append({"error": str(exc)})
    except BaseException as exc:
        results.append({"crash": f"{type(exc).__name__}: {exc}"[:300]})
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"results": results, "peak_mib": peak}))
"""


def decode_in_subprocess(*paths: Path) -> dict[str, Any]:
    """Decode ``paths`` in a fresh process with a memory limit; its results and the rise of its peak RSS (MiB)."""
    proc = subprocess.run([sys.executable, "-c", _DECODE, *map(str, paths)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux_only
def test_thin_and_huge_images_cost_little_memory(tmp_path: Path) -> None:
    """A 1 × 100,000 PNG of a few hundred bytes (today: gigabytes, 1.5 GB at 1 × 20,000) decodes in a few MiB;
    a 9,500 × 9,500 one (more than MAX_PIXELS) is refused from its header, before any pixel is decoded.
    The recipe is kept: a thin strip still gives the colour of its centre, as scaling then cropping did."""
    strip = png_of_zeros(tmp_path / "strip.png", 100_000, 1)
    column = png_of_zeros(tmp_path / "column.png", 1, 100_000)
    bomb = png_of_zeros(tmp_path / "bomb.png", 9_500, 9_500)
    assert strip.stat().st_size < 1_000 and bomb.stat().st_size < 200_000
    out = decode_in_subprocess(strip, column, bomb)
    assert out["results"][0] == {"shape": [3, 64, 64]} and out["results"][1] == {"shape": [3, 64, 64]}, out
    assert "9500×9500" in out["results"][2].get("error", "") and "pixels" in out["results"][2]["error"], out
    assert out["peak_mib"] < 100, out
    Image.new("RGB", (300, 1), (10, 200, 30)).save(tmp_path / "green.png")
    image = load_image(tmp_path / "green.png", 16)
    assert torch.allclose(image, torch.tensor([10, 200, 30]).view(3, 1, 1) / 255.0, atol=1e-5)


# --- files that are not regular files ---------------------------------------------------------------------------

def finishes(work: Callable[[], Any], fifo: Path, seconds: float = 10.0) -> Any:
    """``work()``'s result; fails if it blocks (on today's code, in ``open`` of the pipe ``fifo``, which a
    writer that opens and closes it then releases, so that no thread is left hanging)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # noqa: BLE001 — handed to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    while thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(0.2)
    assert not hung, f"blocked for {seconds} s on the named pipe {fifo.name}"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def odd_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Two images, a named pipe, a socket, a broken link, a link to an image and a link to the pipe."""
    root = tmp_path / "images"
    make_image(root / "a.png")
    make_image(root / "sub" / "b.png")
    os.mkfifo(root / "pipe.png")
    monkeypatch.chdir(root)  # a socket's path must be short
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.png")
    (root / "broken.png").symlink_to(root / "gone.png")
    (root / "link.png").symlink_to(root / "a.png")
    (root / "pipelink.png").symlink_to(root / "pipe.png")
    yield root
    server.close()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_special_files_are_skipped_and_reported_never_opened(odd_folder: Path) -> None:
    stimuli = finishes(lambda: from_folder(odd_folder, None, "image_id", "rating"), odd_folder / "pipe.png")
    source = stimuli.make_source(Preprocessing(16))
    assert sorted(source.ids) == ["a", "b", "link"]
    why = stimuli.unreadable
    assert set(why) == {"pipe.png", "sock.png", "broken.png", "pipelink.png"}, why
    assert "named pipe" in why["pipe.png"] and "never opened" in why["pipe.png"]
    assert "named pipe" in why["pipelink.png"] and "socket" in why["sock.png"]
    assert "broken symbolic link" in why["broken.png"]
    assert finishes(source.fingerprint, odd_folder / "pipe.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_find_images_and_load_image_never_open_a_pipe(odd_folder: Path) -> None:
    """What training, compare and typicality read: the pipe is not listed, and loading it is refused at once."""
    found = finishes(lambda: [p.name for p in find_images(odd_folder)], odd_folder / "pipe.png")
    assert found == ["a.png", "link.png", "b.png"]
    with pytest.raises(InputError, match="named pipe"):
        finishes(lambda: load_image(odd_folder / "pipe.png", 16), odd_folder / "pipe.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_folder_of_only_a_pipe_is_one_clear_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match=r"no readable images .*named pipe"):
        finishes(lambda: from_folder(tmp_path, None, "image_id", "rating"), tmp_path / "pipe.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_training_leaves_a_pipe_out_and_says_so(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from fluency.core.inputs import demo
    from fluency.core.train.training import TrainConfig, train

    images = demo.export(tmp_path / "demo", n=4, size=32, seed=1) / "images"
    os.mkfifo(images / "pipe.png")
    log = io.StringIO()
    cfg = TrainConfig(images=str(images), out=str(tmp_path / "model"), epochs=1, batch_size=4, image_size=32,
                      val_fraction=0.0, figures=False)
    result = finishes(lambda: train(cfg, console=Console(file=log, width=200)), images / "pipe.png", 30)
    assert result.checkpoint.exists()
    assert "pipe.png: a named pipe, not a regular file: skipped, never opened" in log.getvalue()


# --- checkpoints -----------------------------------------------------------------------------------------------

NOT_CHECKPOINTS = {
    "empty": b"",
    "json": json.dumps({"format": "fluency-checkpoint", "format_version": 1}).encode(),
    "readme": b"# My model\n\nTrained on faces. Load it with fluency.\n",
    "random": bytes(range(256)) * 3,
    "pickle": b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.",
}


def assert_fluency_refusal(message: str) -> None:
    assert "\n" not in message and "weights_only" not in message, message


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_a_file_that_is_no_checkpoint_is_named_so(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(NOT_CHECKPOINTS[name])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: not a fluency checkpoint") as caught:
        read_checkpoint(path)
    assert_fluency_refusal(str(caught.value))


def test_a_checkpoint_holding_code_is_refused_without_torchs_advice(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    torch.save({"format": "fluency-checkpoint", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a fluency checkpoint: it holds Python objects") as caught:
        read_checkpoint(tmp_path / "evil.pt")
    assert_fluency_refusal(str(caught.value))


def test_a_folder_given_as_checkpoint_is_named_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def default_payload() -> dict[str, Any]:
    return read_checkpoint(DEFAULT_CHECKPOINT)


def _without(payload: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != key}


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "no-architecture": (lambda p: _without(p, "architecture"), "no field architecture"),
    "no-state-dict": (lambda p: _without(p, "state_dict"), "no field state_dict"),
    "no-version": (lambda p: _without(p, "format_version"), "no field format_version"),
    "version-text": (lambda p: {**p, "format_version": "abc"}, "field format_version is 'abc', not a whole number"),
    "version-float": (lambda p: {**p, "format_version": 1.5}, "field format_version is 1.5"),
    "architecture-list": (lambda p: {**p, "architecture": ["vae-small"]}, "field architecture is"),
    "name-number": (lambda p: {**p, "architecture": {"name": 3, "options": {}}}, "field architecture is"),
    "options-text": (lambda p: {**p, "architecture": {"name": "vae-small", "options": "big"}},
                     "field architecture.options is 'big'"),
    "state-dict-list": (lambda p: {**p, "state_dict": [1, 2]}, "field state_dict is"),
    "state-dict-values": (lambda p: {**p, "state_dict": {"w": "x"}}, "field state_dict is"),
    "epoch-text": (lambda p: {**p, "epoch": "30"}, "field epoch is '30'"),
    "history-numbers": (lambda p: {**p, "history": [1, 2]}, "field history is"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_missing_or_malformed_fields_are_one_line_naming_the_field(case: str, default_payload: dict[str, Any],
                                                                     tmp_path: Path, manager) -> None:
    change, message = MALFORMED[case]
    torch.save(change(default_payload), tmp_path / "bad.pt")
    for read in (read_checkpoint, lambda path: load_checkpoint(path, manager)):
        with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'bad.pt'}: ") as caught:
            read(tmp_path / "bad.pt")
        assert message in str(caught.value)
        assert_fluency_refusal(str(caught.value))


ABSURD = {  # option changes of the shipped vae-small checkpoint, and the field the refusal names
    "latent": ({"latent_dim": 10**12}, "latent_dim: 1000000000000 is above the maximum"),
    "image": ({"image_size": 10**9}, "image_size: 1000000000 is above the maximum"),
    "channels": ({"channels": [10**6] * 5}, r"channels[0]: 1000000 is above the maximum"),
    "total": ({"image_size": 2048, "latent_dim": 65536, "channels": [4096] * 5},
              "parameters, more than fluency builds"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_architecture_sizes_are_refused_before_a_model_is_built(case: str, default_payload: dict[str, Any],
                                                                       tmp_path: Path, manager) -> None:
    change, message = ABSURD[case]
    arch = default_payload["architecture"]
    torch.save({**default_payload, "architecture": {**arch, "options": {**arch["options"], **change}}},
               tmp_path / "huge.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'huge.pt'}: ") as caught:
        load_checkpoint(tmp_path / "huge.pt", manager)
    assert message in str(caught.value)


@pytest.mark.parametrize("name", ["vae-small", "vae-vgg16", "vae-vgg19"])
def test_builtin_architectures_bound_every_size(name: str, manager) -> None:
    options = manager.get("architecture", name).options
    sizes = [k for k in ("image_size", "latent_dim", "channels", "decoder_channels", "width", "attention_reduction")
             if k in options]
    assert [k for k in sizes if options[k].maximum is None] == []


def test_resume_from_a_checkpoint_without_training_state_is_one_line(tmp_path: Path) -> None:
    from fluency.core.inputs import demo
    from fluency.core.train.training import TrainConfig, train

    images = demo.export(tmp_path / "demo", n=4, size=32, seed=1) / "images"
    out = tmp_path / "model"
    out.mkdir()
    shutil.copyfile(DEFAULT_CHECKPOINT, out / "last.pt")  # e.g. the shipped model copied in by hand
    cfg = TrainConfig(images=str(images), out=str(out), epochs=2, batch_size=4, image_size=64, figures=False)
    with pytest.raises(CheckpointError, match=r"--resume: checkpoint .*last\.pt has no training state") as caught:
        train(cfg, resume=True)
    assert_fluency_refusal(str(caught.value))


def test_run_with_a_readme_as_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "README.pt").write_text("# not a model\n")
    env = {**os.environ, "COLUMNS": "200", "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "fluency.cli", "run", "--metric", "gini", "--checkpoint",
                           str(tmp_path / "README.pt"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "README.pt: not a fluency checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert "weights_only" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a small real checkpoint (a vae-small of single-channel blocks), for corrupting."""
    from fluency.plugins.default_vae_small import VAESmall

    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    model = VAESmall(image_size=32, latent_dim=2, channels=[1] * 5, decoder_channels=[1] * 5)
    save_checkpoint(path, model, "vae-small", epoch=1, history=[{"epoch": 1, "loss": 0.5}])
    return path.read_bytes()


def corrupted(original: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, or ``original`` truncated or with some bytes overwritten."""
    def overwrite(edits: list[tuple[int, int]]) -> bytes:
        data = bytearray(original)
        for position, value in edits:
            data[position % len(data)] = value
        return bytes(data)

    return st.one_of(st.binary(max_size=2048),
                     st.integers(0, len(original) - 1).map(lambda n: original[:n]),
                     st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)),
                              min_size=1, max_size=8).map(overwrite))


def test_random_and_corrupted_bytes_give_only_fluency_errors(tiny_checkpoint: bytes, manager) -> None:
    """Property: whatever the bytes, the checkpoint loader returns a model or raises a FluencyError, and a
    refusal never passes on torch's advice to load with weights_only=False."""
    folder = Path(tempfile.mkdtemp(prefix="fluency-fuzz-"))

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(corrupted(tiny_checkpoint))
    def check(data: bytes) -> None:
        path = folder / "fuzz.pt"
        path.write_bytes(data)
        try:
            load_checkpoint(path, manager)
        except FluencyError as exc:
            assert_fluency_refusal(str(exc))

    try:
        check()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
