"""The minimal `fluency train`: checkpoints that load safely, seeds, the NaN guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluency.core import demo, training
from fluency.core.checkpoint import load_checkpoint, read_checkpoint
from fluency.core.errors import TrainingError


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.export(tmp_path_factory.mktemp("demo"), n=24, size=32, seed=3) / "images"


def test_cli_train_writes_a_self_describing_checkpoint(images: Path, tmp_path: Path, manager) -> None:
    env = {**os.environ, "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "fluency.cli", "train", "--arch", "vae-small", "--images",
                           str(images), "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--out",
                           str(tmp_path / "m"), "-o", "adam.lr=0.002", "-o", "vae-small.latent_dim=4", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    payload = read_checkpoint(tmp_path / "m" / "final.pt")  # weights_only=True
    assert payload["architecture"] == {"name": "vae-small", "options": {
        "image_size": 32, "in_channels": 3, "latent_dim": 4, "channels": [16, 32, 64, 64, 128],
        "decoder_channels": [64, 64, 32, 16, 8]}}
    assert payload["optimizer"]["options"]["lr"] == 0.002 and payload["epoch"] == 2
    assert payload["provenance"]["n_images"] == 24 and payload["provenance"]["stimulus_fingerprint"]
    loaded = load_checkpoint(tmp_path / "m" / "final.pt", manager)
    assert loaded.model.input_shape == (3, 32, 32)


def test_training_lowers_the_loss_and_is_reproducible(images: Path, tmp_path: Path, manager) -> None:
    a = training.train(images, tmp_path / "a", epochs=4, batch_size=8, image_size=32, seed=7, manager=manager)
    b = training.train(images, tmp_path / "b", epochs=4, batch_size=8, image_size=32, seed=7, manager=manager)
    assert a.history[-1]["loss"] < a.history[0]["loss"]
    sa = read_checkpoint(a.checkpoint)["state_dict"]
    sb = read_checkpoint(b.checkpoint)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(images: Path, tmp_path: Path, manager,
                                                                     monkeypatch) -> None:
    real = training.vae_loss_terms
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] > 3:  # 24 images / batch 8 = 3 steps: epoch 2 goes bad
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(training, "vae_loss_terms", poisoned)
    with pytest.raises(TrainingError, match=r"epoch 2: the loss became nan.*last good checkpoint"):
        training.train(images, tmp_path / "n", epochs=3, batch_size=8, image_size=32, manager=manager)
    assert read_checkpoint(tmp_path / "n" / "final.pt")["epoch"] == 1
