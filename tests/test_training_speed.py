"""`fluency train --workers` and `--amp` (issue 16): decoding processes that never change a trained model,
one-line errors from them, bfloat16 autocast on the CPU, float16 refused where it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluency.core.errors import InputError, OptionError, TrainingError
from fluency.core.inputs import demo
from fluency.core.model.checkpoint import read_checkpoint
from fluency.core.train import loading, precision, training
from fluency.core.train.training import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread: these tiny models gain nothing from more, and on a loaded machine two threads that
    wait on each other made the tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.export(tmp_path_factory.mktemp("demo"), n=24, size=32, seed=3) / "images"


def config(images: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"images": str(images), "out": str(out), "epochs": 1, "batch_size": 8, "image_size": 32,
                          "figures": False, "workers": 0, **kw})


def weights(result: training.TrainResult) -> dict[str, torch.Tensor]:
    return read_checkpoint(result.checkpoint)["state_dict"]


def same_weights(a: training.TrainResult, b: training.TrainResult) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def without_time(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_workers_do_not_change_the_trained_weights(images: Path, tmp_path: Path, manager) -> None:
    """Bit for bit, after an epoch that draws sampled latents (the global generator) between loader passes."""
    none = training.train(config(images, tmp_path / "w0", epochs=2), manager=manager)
    two = training.train(config(images, tmp_path / "w2", epochs=2, workers=2), manager=manager)
    assert same_weights(none, two)
    assert without_time(none.history) == without_time(two.history)


def test_an_epoch_reads_the_images_in_the_order_of_a_seeded_shuffling_loader() -> None:
    """The order of earlier versions (a shuffling DataLoader per epoch), so a seed trains the same model."""
    for n, seed in ((24, 5), (1000, 100_004)):
        loader = torch.utils.data.DataLoader(list(range(n)), batch_size=7, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        assert loading.epoch_order(n, seed) == [i for batch in loader for i in batch.tolist()]


def test_a_pass_takes_from_the_global_generator_what_a_fresh_loader_took(images: Path) -> None:
    """Earlier versions made a loader per pass, which drew its base seed from torch's global generator; the
    persistent loaders draw the same, so the sampled latents that follow (and the weights) stay a seed's."""
    from fluency.core.inputs.images import FolderSource, Preprocessing

    source = FolderSource(images, {p.stem: p for p in sorted(images.glob("*.png"))[:4]}, Preprocessing(32, 3))
    loader = loading.image_loader(source, range(4), 2, 0, torch.device("cpu"))

    def generator_after(one_pass) -> torch.Tensor:
        torch.manual_seed(11)
        one_pass()
        return torch.get_rng_state()

    fresh = generator_after(lambda: list(torch.utils.data.DataLoader(loading.ImageSubset(source, range(4)), 2)))
    persistent = generator_after(lambda: list(loading.fresh_pass(loader, torch.device("cpu"))))
    assert torch.equal(fresh, persistent) and not torch.equal(fresh, generator_after(lambda: None))


def test_worker_count_and_its_setting() -> None:
    assert [loading.worker_count("auto", "cuda", cpus) for cpus in (1, 2, 3, 16)] == [0, 1, 2, 4]
    assert [loading.worker_count("auto", "cpu", cpus) for cpus in (1, 2, 3, 16)] == [0, 0, 2, 4]
    assert loading.worker_count("3") == 3 and loading.worker_count(0) == 0
    for bad in (-1, "two", 1.5, True, ""):
        with pytest.raises(OptionError, match="give a number of image-decoding processes"):
            TrainConfig(images="i", out="o", workers=bad).check()
    with pytest.raises(OptionError, match=r"amp 'fp8': use one of \['off', 'bf16', 'fp16'\]"):
        TrainConfig(images="i", out="o", amp="fp8").check()


def test_an_unreadable_image_is_one_line_naming_it_with_workers(images: Path, tmp_path: Path, manager) -> None:
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    (folder / "stim-005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError) as caught:
        training.train(config(folder, tmp_path / "o", workers=2), manager=manager)
    assert str(caught.value).startswith(f"cannot read image {folder / 'stim-005.png'}: ")
    assert "\n" not in str(caught.value) and "worker" not in str(caught.value)


def test_a_worker_that_dies_stops_training_with_one_line(images: Path, tmp_path: Path, manager,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = loading.ImageSubset.__getitem__

    def dying(self: loading.ImageSubset, i: int):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(1)  # as a decoder crash or the out-of-memory killer would end it
        return real(self, i)

    monkeypatch.setattr(loading.ImageSubset, "__getitem__", dying)
    with pytest.raises(TrainingError, match=r"an image-decoding worker stopped \(DataLoader worker .*--workers 0"):
        training.train(config(images, tmp_path / "o", workers=1), manager=manager)


def test_bf16_on_the_cpu_trains_close_to_float32_with_adam_and_sam(images: Path, tmp_path: Path, manager) -> None:
    for optimizer in ("adam", "sam"):
        full = training.train(config(images, tmp_path / f"f-{optimizer}", optimizer=optimizer), manager=manager)
        half = training.train(config(images, tmp_path / f"b-{optimizer}", optimizer=optimizer, amp="bf16"),
                              manager=manager)
        for a, b in zip(full.history, half.history):
            assert all(torch.isfinite(torch.tensor(v)) for v in b.values())
            assert b["loss"] == pytest.approx(a["loss"], rel=0.02) and b["val_loss"] == pytest.approx(a["val_loss"],
                                                                                                      rel=0.02)
            assert b["loss"] != a["loss"]  # it did run in bfloat16
        assert {v.dtype for v in weights(half).values() if v.is_floating_point()} == {torch.float32}


def test_resume_keeps_the_amp_setting(images: Path, tmp_path: Path, manager) -> None:
    straight = training.train(config(images, tmp_path / "s", epochs=2, amp="bf16"), manager=manager)
    training.train(config(images, tmp_path / "r", epochs=1, amp="bf16"), manager=manager)
    resumed = training.train(config(images, tmp_path / "r", epochs=2), manager=manager, resume=True)
    assert read_checkpoint(resumed.checkpoint)["training"]["config"]["amp"] == "bf16"
    assert same_weights(straight, resumed)


def test_fp16_is_refused_on_the_cpu_and_with_sam(images: Path, tmp_path: Path, manager,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OptionError, match="--amp fp16 needs a CUDA device .* this run is on cpu; use --amp bf16"):
        training.train(config(images, tmp_path / "o", amp="fp16"), manager=manager)
    monkeypatch.setattr(precision, "check_amp_device", lambda mode, device: None)  # as if on a GPU
    with pytest.raises(OptionError, match="--amp fp16 cannot train with optimizer 'sam': .* use --amp bf16"):
        training.train(config(images, tmp_path / "o", amp="fp16", optimizer="sam"), manager=manager)


def test_the_fp16_gradient_scaler_path_trains_and_resumes_exactly(images: Path, tmp_path: Path, manager,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path run on the CPU (which autocasts to float16 too): the scaler backs off from its first,
    overflowing scale, then the loss falls; its state is saved and restored by --resume."""
    monkeypatch.setattr(precision, "check_amp_device", lambda mode, device: None)
    files = sorted(images.glob("*.png"))[:10]  # float16 is slow on the CPU: 9 steps of one image per epoch
    settings = {"amp": "fp16", "batch_size": 1, "beta": 0.0}
    straight = training.train(config(images, tmp_path / "s", epochs=2, **settings), manager=manager, files=files)
    assert straight.history[-1]["loss"] < straight.history[0]["loss"]
    scaler = read_checkpoint(straight.checkpoint)["training"]["scaler_state"]
    assert 1 <= scaler["scale"] < 2.0**16
    training.train(config(images, tmp_path / "r", epochs=1, **settings), manager=manager, files=files)
    resumed = training.train(config(images, tmp_path / "r", epochs=2, **settings), manager=manager, files=files,
                             resume=True)
    assert same_weights(straight, resumed)
    assert read_checkpoint(resumed.checkpoint)["training"]["scaler_state"] == scaler


def test_bad_workers_and_amp_on_the_command_line_are_one_line(images: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    for flags, message in ((["--workers", "two"], "error: train: workers 'two': give a number"),
                           (["--amp", "fp16", "--device", "cpu"], "error: --amp fp16 needs a CUDA device")):
        proc = subprocess.run([sys.executable, "-m", "fluency.cli", "train", "--images", str(images), "--out",
                               str(tmp_path / "o"), *flags], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
