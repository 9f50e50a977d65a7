"""`fluency train`: checkpoints, history, figures, exact resume, the NaN guard, losses, subgroup models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fluency.core.inputs import demo
from fluency.core.train import training
from fluency.core.model.checkpoint import load_checkpoint, read_checkpoint
from fluency.core.errors import FluencyError, InputError, TrainingError
from fluency.core.train.training import TrainConfig

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.export(tmp_path_factory.mktemp("demo"), n=24, size=32, seed=3) / "images"


def config(images: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"images": str(images), "out": str(out), "epochs": 2, "batch_size": 8, "image_size": 32,
                          "figures": False, **kw})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "fluency.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_train_writes_checkpoint_history_config_and_figures(images: Path, tmp_path: Path, manager) -> None:
    out = tmp_path / "m"
    proc = cli("train", "--arch", "vae-small", "--images", str(images), "--epochs", "2", "--batch-size", "8",
               "--image-size", "32", "--out", str(out), "--lr", "0.002", "-o", "vae-small.latent_dim=4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [h["epoch"] for h in json.loads(proc.stdout)["history"]] == [1, 2]
    payload = read_checkpoint(out / "final.pt")  # weights_only=True
    assert payload["architecture"]["name"] == "vae-small" and payload["architecture"]["options"]["latent_dim"] == 4
    assert payload["optimizer"]["options"]["lr"] == 0.002 and payload["epoch"] == 2
    assert payload["data"]["n_images"] == 24 and payload["data"]["n_val"] == 2 and payload["data"]["fingerprint"]
    assert payload["loss"]["terms"] == [{"name": "l2", "weight": 1.0, "options": {}}]
    history = pd.read_parquet(out / "history.parquet")
    assert list(history["epoch"]) == [1, 2] and {"loss", "recon", "kl", "val_loss", "lr"} <= set(history.columns)
    assert (out / "figures" / "curves.png").stat().st_size > 0 and (out / "figures" / "recon-epoch-002.png").exists()
    assert load_checkpoint(out / "final.pt", manager).model.input_shape == (3, 32, 32)
    inspect = cli("checkpoints", "inspect", str(out / "final.pt"), "--json")
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["epoch"] == 2
    # the saved config repeats the run
    again = cli("train", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again"), "--no-figures")
    assert again.returncode == 0, again.stderr
    a, b = read_checkpoint(out / "final.pt")["state_dict"], read_checkpoint(tmp_path / "again" / "final.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_settings_and_losses_are_errors(images: Path, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[train]\nepochz = 3\n")
    proc = cli("train", "--config", str(tmp_path / "c.toml"), "--images", str(images), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "epochz" in proc.stderr
    proc = cli("train", "--images", str(images), "--out", str(tmp_path / "o"), "--loss", "l3")
    assert proc.returncode == 2 and "unknown loss" in proc.stderr


def test_training_lowers_the_loss_and_is_reproducible(images: Path, tmp_path: Path, manager) -> None:
    a = training.train(config(images, tmp_path / "a", epochs=4, seed=7), manager=manager)
    b = training.train(config(images, tmp_path / "b", epochs=4, seed=7), manager=manager)
    assert a.history[-1]["loss"] < a.history[0]["loss"]
    sa, sb = read_checkpoint(a.checkpoint)["state_dict"], read_checkpoint(b.checkpoint)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("settings", [
    {},
    {"optimizer": "sam", "schedule": "linear-warmup-cosine", "warmup_epochs": 1},
    {"optimizer": "sgd", "schedule": "step", "schedule_step_size": 1, "schedule_gamma": 0.5},
], ids=["adam", "sam-warmup-cosine", "sgd-step"])
def test_resume_is_exact(images: Path, tmp_path: Path, manager, settings: dict) -> None:
    """1 epoch, then --resume to 2 epochs, gives the same weights as 2 epochs straight (optimizer and
    scheduler state included)."""
    straight = training.train(config(images, tmp_path / "straight", epochs=2, beta_warmup=2, **settings),
                              manager=manager)
    training.train(config(images, tmp_path / "resumed", epochs=1, beta_warmup=2, **settings), manager=manager)
    resumed = training.train(config(images, tmp_path / "resumed", epochs=2, beta_warmup=2, **settings),
                             manager=manager, resume=True)
    assert straight.history[-1]["lr"] == resumed.history[-1]["lr"]
    sa, sb = read_checkpoint(straight.checkpoint)["state_dict"], read_checkpoint(resumed.checkpoint)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    with pytest.raises(FluencyError, match="use --resume"):
        training.train(config(images, tmp_path / "resumed"), manager=manager)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(images: Path, tmp_path: Path, manager,
                                                                     monkeypatch) -> None:
    from fluency.core.plugin import architecture

    real = architecture.kl_divergence
    calls = {"n": 0}

    def poisoned(mu, logvar):
        calls["n"] += 1
        kl = real(mu, logvar)
        return kl * float("nan") if calls["n"] > 4 else kl  # epoch 1: 3 steps + 1 validation batch

    monkeypatch.setattr(architecture, "kl_divergence", poisoned)
    with pytest.raises(TrainingError, match=r"epoch 2: the loss became non-finite .*last.pt keeps epoch 1"):
        training.train(config(images, tmp_path / "n", epochs=3), manager=manager)
    assert read_checkpoint(tmp_path / "n" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "n" / "final.pt").exists()


def test_corrupt_image_is_named(images: Path, tmp_path: Path, manager) -> None:
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    (folder / "stim-005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError, match="stim-005.png"):
        training.train(config(folder, tmp_path / "o", epochs=1), manager=manager)


def test_multiple_reconstruction_losses(images: Path, tmp_path: Path, manager) -> None:
    result = training.train(config(images, tmp_path / "o", epochs=1, losses=["l1", "ssim:50"]), manager=manager)
    assert {"recon_l1", "recon_ssim", "val_recon_ssim"} <= set(result.history[0])
    terms = read_checkpoint(result.checkpoint)["loss"]["terms"]
    assert [(t["name"], t["weight"]) for t in terms] == [("l1", 1.0), ("ssim", 50.0)]


@pytest.mark.skipif(not (SHARED_WEIGHTS / "alexnet_imagenet_features.pth").exists(),
                    reason="shared offline AlexNet weights not present")
def test_lpips_loss_stays_frozen_while_the_model_trains(images: Path, tmp_path: Path, manager) -> None:
    pytest.importorskip("lpips")
    from fluency.core.model.losses import ReconstructionLoss

    weights = str(SHARED_WEIGHTS / "alexnet_imagenet_features.pth")
    loss = ReconstructionLoss([{"name": "lpips", "weight": 1.0, "options": {"weights": weights}}])
    lp = loss.losses[0]._frozen[0]
    before = {k: v.clone() for k, v in lp.state_dict().items()}
    model = manager.get("architecture", "vae-small").load()(image_size=32)
    assert not any(p is q for p in model.parameters() for q in lp.parameters())
    assert list(loss.parameters()) == []  # nothing of LPIPS is optimisable through the loss module
    opt = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=1e-2)
    x = torch.rand(4, 3, 32, 32)
    model.train()
    loss.train()
    for _ in range(2):
        opt.zero_grad()
        loss(model(x).recon, x).mean().backward()
        opt.step()
    assert not lp.training
    assert all(torch.equal(before[k], v) for k, v in lp.state_dict().items())
    a, b = loss(x, x.flip(0)), loss(x, x.flip(0))
    assert torch.equal(a, b)  # eval mode: no dropout
    result = training.train(config(images, tmp_path / "lp", epochs=1, losses=["l2", "lpips:100"],
                                   options=[f"lpips.weights={weights}"]), manager=manager)
    assert "recon_lpips" in result.history[0]


def test_one_model_per_subgroup_and_small_groups_refused(images: Path, tmp_path: Path, manager) -> None:
    ids = sorted(p.stem for p in images.glob("*.png"))
    table = pd.DataFrame({"image_id": ids, "sex": ["f"] * 12 + ["m"] * 10 + ["x"] * 2})
    table.to_csv(tmp_path / "groups.csv", index=False)
    cfg = config(images, tmp_path / "set", epochs=1)
    summary = training.train_by_group(cfg, tmp_path / "groups.csv", "image_id", ["sex"], min_size=8, manager=manager)
    by_label = {g["label"]: g for g in summary["groups"]}
    assert by_label["sex=f"]["n_images"] == 12 and Path(by_label["sex=f"]["checkpoint"]).exists()
    assert read_checkpoint(by_label["sex=m"]["checkpoint"])["data"]["n_images"] == 10
    assert "refused" in by_label["sex=x"] and "fewer than" in by_label["sex=x"]["refused"]
    assert json.loads((tmp_path / "set" / "checkpoints.json").read_text())["by"] == ["sex"]
    with pytest.raises(FluencyError, match="every subgroup is smaller"):
        training.train_by_group(config(images, tmp_path / "none", epochs=1), tmp_path / "groups.csv", "image_id",
                                ["sex"], min_size=100, manager=manager)


def test_schedule_options_reach_the_scheduler(images: Path, tmp_path: Path, manager) -> None:
    """--schedule step with --schedule-step-size 1 --schedule-gamma 0.5 halves the rate every epoch
    (history's lr is the rate in force at the end of each epoch)."""
    result = training.train(config(images, tmp_path / "s", epochs=3, lr=0.01, schedule="step",
                                   schedule_step_size=1, schedule_gamma=0.5), manager=manager)
    assert [round(h["lr"], 8) for h in result.history] == [0.005, 0.0025, 0.00125]


def test_checkpoint_of_an_unknown_architecture_names_the_missing_plugin(images: Path, tmp_path: Path,
                                                                         manager) -> None:
    from fluency.core.errors import CheckpointError

    result = training.train(config(images, tmp_path / "m", epochs=1), manager=manager)
    payload = read_checkpoint(result.checkpoint)
    payload["architecture"]["name"] = "vae-from-another-package"
    torch.save(payload, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"needs the architecture plugin 'vae-from-another-package'"):
        load_checkpoint(tmp_path / "foreign.pt", manager)
    inspect = cli("checkpoints", "inspect", str(result.checkpoint))
    assert inspect.returncode == 0 and "vae-small" in inspect.stdout


def test_a_saved_config_trains_the_same_model_from_any_folder(images: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import tomllib

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(images, project / "faces")
    elsewhere.mkdir()
    (project / "alex.pth").write_bytes(b"weights")
    monkeypatch.chdir(project)  # typed with relative paths, as a user does
    training.train(config(Path("faces"), Path("models/mine"), epochs=1, options=["adam.beta1=0.5"]))
    saved = tomllib.loads((project / "models" / "mine" / "config.toml").read_text())["train"]
    assert saved["images"] == str(project / "faces") and saved["out"] == str(project / "models" / "mine")
    assert saved["options"] == ["adam.beta1=0.5"]
    monkeypatch.chdir(elsewhere)
    again = cli("train", "--config", str(project / "models" / "mine" / "config.toml"), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not (elsewhere / "models").exists() and (project / "models" / "mine" / "final.pt").exists()
    monkeypatch.chdir(project)  # an option's value naming a file is saved absolute too; other values stay
    options = training.with_absolute_paths(config(Path("faces"), Path("m"), options=["lpips.weights=alex.pth",
                                                                                    "adam.beta1=0.5"])).options
    assert options == [f"lpips.weights={project / 'alex.pth'}", "adam.beta1=0.5"]
