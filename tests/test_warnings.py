"""Warnings a researcher needs: a collapsed latent, stimuli out of the model's training distribution, a
sparsity constraint that did not take effect; each fires when it should and stays silent on a healthy model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import fluency
from fluency.core.inputs import demo
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, read_checkpoint
from fluency.core.model.diagnostics import ACTIVE_KL, fit_warning
from fluency.core.outputs.training_figures import TrainingFigures
from fluency.core.train import training
from fluency.core.train.training import TrainConfig, training_warnings


def kinds(warnings: list[dict[str, str]]) -> list[str]:
    return [w["kind"] for w in warnings]


def modified_default(path: Path, change) -> Path:
    """A copy of the shipped checkpoint with ``change(payload)`` applied (a checkpoint built directly)."""
    payload = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


def run(**settings) -> dict:
    settings = {"progress": False, "figures": False, "report": False, "covariates": False, "overwrite": True,
                "analyses": (), **settings}
    return fluency.run(**settings).manifest


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.export(tmp_path_factory.mktemp("demo"), n=16, size=32, seed=3) / "images"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few more images of the shipped model's own generator, at its size."""
    return demo.export(tmp_path_factory.mktemp("shapes"), n=24, size=64, seed=5) / "images"


@pytest.fixture(scope="module")
def constrained(images: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model trained 2 epochs (its latent collapses: KL starts near 0 and has no time to grow), with a
    kl-sparsity constraint of no weight on enc2 (target not reached) and l1-activation (no target) on enc3."""
    out = tmp_path_factory.mktemp("trained")
    text = io.StringIO()
    cfg = TrainConfig(images=str(images), out=str(out), epochs=2, batch_size=8, image_size=32,
                      constraints=["kl-sparsity", "l1-activation"],
                      options=["vae-small.latent_dim=4", "kl-sparsity.layers=[enc2]", "kl-sparsity.weight=0",
                               "kl-sparsity.rho=0.001", "l1-activation.layers=[enc3]"])
    result = training.train(cfg, console=Console(file=text, width=400), observer=TrainingFigures(n_images=2))
    return result, text.getvalue()


def test_training_records_fit_latent_and_sparsity_and_warns(constrained) -> None:
    result, printed = constrained
    payload = read_checkpoint(result.checkpoint)
    fit, latent = payload["fit"], payload["latent"]
    assert fit["loss"] == "l2" and fit["n"] == 2 and fit["p50"] <= fit["p95"] and fit["sd"] >= 0
    assert latent["dims"] == 4 and latent["kl_per_dim"] <= ACTIVE_KL and latent["active"] == 0
    sparsity = {e["layer"]: e for e in payload["sparsity"]}
    assert sparsity["enc2"]["target"] == 0.001 and sparsity["enc2"]["measure"] == "mean tanh(x)"
    assert sparsity["enc3"]["target"] is None and sparsity["enc3"]["reached"] > 0  # l1: logged, no target
    assert {"mean_act[enc2]", "mean_act[enc3]", "val_mean_act[enc2]"} <= set(result.history[-1])
    assert kinds(result.warnings) == ["collapsed-latent", "sparsity-not-reached"]
    collapsed, sparse = (w["message"] for w in result.warnings)
    assert str(result.checkpoint) in collapsed and "0 of 4 dimensions active" in collapsed
    assert "recon-epoch-002.png" in collapsed and "--beta" in collapsed
    assert "enc2" in sparse and "ρ = 0.001" in sparse and "enc3" not in sparse
    assert printed.count("warning:") == 2 and collapsed in " ".join(printed.split())


def test_training_warnings_are_silent_on_a_healthy_model(tmp_path: Path) -> None:
    healthy = {"latent": {"dims": 4, "kl_total": 20.0, "kl_per_dim": 5.0, "active": 4},
               "sparsity": [{"constraint": "kl-sparsity", "layer": "enc2", "target": 0.05, "reached": 0.06},
                            {"constraint": "l1-activation", "layer": "enc3", "target": None, "reached": 3.0}]}
    assert training_warnings(tmp_path / "final.pt", healthy, tmp_path / "none.png") == []
    collapsed = {**healthy, "latent": {**healthy["latent"], "kl_per_dim": 0.005, "active": 1}}
    assert kinds(training_warnings(tmp_path / "final.pt", collapsed, tmp_path / "none.png")) == ["collapsed-latent"]
    assert training_warnings(tmp_path / "final.pt", {"latent": "damaged", "sparsity": {}}, tmp_path) == []


def test_measuring_warns_of_collapse_and_sparsity_from_the_run_passes(constrained, images: Path,
                                                                       tmp_path: Path) -> None:
    result, _ = constrained
    manifest = run(metrics=["gini"], images=str(images), checkpoints=[str(result.checkpoint)],
                   out=str(tmp_path / "r"))
    assert kinds(manifest["warnings"]) == ["collapsed-latent", "sparsity-not-reached"]  # no decoder metric: no fit
    label = manifest["inputs"]["checkpoints"][0]["label"]
    assert all(w["checkpoint"] == label and w["message"].startswith(f"checkpoint {label}: ")
               for w in manifest["warnings"])
    assert "over the stimuli" in manifest["warnings"][1]["message"]
    # the same weights read against a target they meet: silent
    payload = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    payload["constraints"][0]["options"]["rho"] = 0.5
    reached = tmp_path / "reached.pt"
    torch.save(payload, reached)
    manifest = run(metrics=["gini"], images=str(images), checkpoints=[str(reached)], out=str(tmp_path / "s"))
    assert kinds(manifest["warnings"]) == ["collapsed-latent"]


def test_a_collapsed_shipped_model_is_named_with_its_figure(shapes: Path, tmp_path: Path) -> None:
    def collapse(payload: dict) -> None:  # μ = 0 and log σ² = 0 for every image: KL exactly 0
        for key in ("mu.weight", "mu.bias", "logvar.weight", "logvar.bias"):
            payload["state_dict"][key].zero_()
    checkpoint = modified_default(tmp_path / "collapsed.pt", collapse)
    manifest = run(metrics=["recon-error"], images=str(shapes), checkpoints=[str(checkpoint)], figures=True,
                   out=str(tmp_path / "r"))
    warning = next(w for w in manifest["warnings"] if w["kind"] == "collapsed-latent")
    assert warning["checkpoint"] == "collapsed" and "0 of 32 dimensions active" in warning["message"]
    assert "KL 0 nats per dimension" in warning["message"]
    assert str(tmp_path / "r" / "figures" / "recon-collapsed.png") in warning["message"]


def test_the_shipped_model_on_its_own_stimuli_gets_no_warning(tmp_path: Path) -> None:
    manifest = run(metrics=["recon-error"], out=str(tmp_path / "r"), report=True)
    assert manifest["warnings"] == []
    assert "class='warnings'" not in (tmp_path / "r" / "report.html").read_text()


def test_the_shipped_model_on_faces_is_out_of_distribution(london_faces: Path, tmp_path: Path) -> None:
    from fluency.cli import cli

    args = ["run", "--metric", "gini", "--images", str(london_faces / "images"), "--no-figures",
            "--no-covariates", "--check-fit", "--out", str(tmp_path / "r"), "--json"]
    proc = CliRunner().invoke(cli, args)
    assert proc.exit_code == 0, proc.output
    found = json.loads(proc.stdout)["warnings"]
    assert kinds(found) == ["out-of-distribution"] and found[0]["checkpoint"] == "default"
    assert "95th percentile" in found[0]["message"] and "fluency train" in found[0]["message"]
    assert "warning: checkpoint default: stimuli out of the training distribution" in proc.stderr.replace("\n", " ")
    page = (tmp_path / "r" / "report.html").read_text()
    assert "class='warnings'" in page and "stimuli out of the training distribution" in page
    # no decoding metric and no --check-fit: nothing is decoded for the check, so nothing is said
    assert run(metrics=["gini"], images=str(london_faces / "images"), out=str(tmp_path / "g"))["warnings"] == []


def test_an_older_checkpoint_says_once_that_fit_cannot_be_checked(shapes: Path, tmp_path: Path) -> None:
    older = modified_default(tmp_path / "older.pt", lambda p: p.pop("fit"))
    manifest = run(metrics=["recon-error", "elbo"], images=str(shapes), checkpoints=[str(older)],
                   out=str(tmp_path / "r"))
    assert kinds(manifest["warnings"]) == ["fit-unchecked"]
    assert "older checkpoint" in manifest["warnings"][0]["message"]


def test_the_fit_rule() -> None:
    fit = {"p50": 10.0, "p95": 20.0}
    assert fit_warning("m", {"p50": 20.0, "loss": "l2"}, fit) is None  # at the 95th percentile: in
    assert fit_warning("m", {"p50": 20.5, "loss": "l2"}, fit)["kind"] == "out-of-distribution"
    assert fit_warning("m", None, fit) is None  # nothing measured, nothing said
    assert fit_warning("m", {"p50": 1.0}, {"p95": float("nan")})["kind"] == "fit-unchecked"
