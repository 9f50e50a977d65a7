"""The architecture contract's three kinds: a VAE, a flow and an encoder-only model; training asks the model
for its objective and metrics name what they require of a model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

import fluency
from fluency.api import (ArchitectureSpec, EncoderOutput, FlowOutput, FluencyEncoder, FluencyFlow, MetricSpec,
                         ObjectiveSettings, Option, hookimpl)
from fluency.core.errors import FluencyError, TrainingError
from fluency.core.inputs import demo
from fluency.core.train import training
from fluency.core.train.training import TrainConfig


class AffineFlow(FluencyFlow):
    """z = (x − ½)·e^s + t per channel: invertible, log|det| = H·W·Σ_c s_c."""

    default_metric_layers = ("z",)

    def __init__(self, image_size: int = 16) -> None:
        super().__init__(image_size=image_size)
        self.s = nn.Parameter(torch.zeros(3))
        self.t = nn.Parameter(torch.zeros(3))
        self.tap = nn.Identity()

    def hookable_layers(self) -> dict[str, nn.Module]:
        return {"z": self.tap}

    def forward(self, x: torch.Tensor, sample: bool = True) -> FlowOutput:
        z = self.tap((x - 0.5) * self.s.exp().view(1, 3, 1, 1) + self.t.view(1, 3, 1, 1))
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        log_det = x.shape[2] * x.shape[3] * self.s.sum()
        return FlowOutput(z, log_pz + log_det, x[0].numel())

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.t.view(1, 3, 1, 1)) * (-self.s).exp().view(1, 3, 1, 1) + 0.5


class Identity(FluencyEncoder):
    """An encoder-only model: one fixed convolution."""

    default_metric_layers = ("conv",)

    def __init__(self, image_size: int = 16) -> None:
        super().__init__(image_size=image_size)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def hookable_layers(self) -> dict[str, nn.Module]:
        return {"conv": self.conv}

    def forward(self, x: torch.Tensor, sample: bool = True) -> EncoderOutput:
        return EncoderOutput(self.conv(x))


class KindsPlugin:
    @hookimpl
    def fluency_register_architectures(self):
        size = {"image_size": Option("int", 16, "side", minimum=4)}
        return [ArchitectureSpec("affine-flow", AffineFlow, "test flow", size),
                ArchitectureSpec("conv-encoder", Identity, "test encoder", size)]


@pytest.fixture
def kinds_manager(manager):
    manager.register(KindsPlugin(), "kinds", "kinds-pkg", "1.0")
    return manager


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.export(tmp_path_factory.mktemp("kinds"), n=16, size=16, seed=5) / "images"


def test_flow_objective_is_the_exact_nll_in_bits_per_dimension() -> None:
    model = AffineFlow()
    with torch.no_grad():
        model.s.copy_(torch.tensor([0.3, -0.2, 0.1]))
        model.t.copy_(torch.tensor([0.05, 0.0, -0.1]))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    terms = model.objective(model(x), x, ObjectiveSettings())
    s, t = model.s.detach().numpy(), model.t.detach().numpy()
    z = (x.numpy() - 0.5) * np.exp(s)[None, :, None, None] + t[None, :, None, None]
    log_px = stats.norm.logpdf(z).reshape(4, -1).sum(1) + 16 * 16 * s.sum()
    expected = -log_px / (3 * 16 * 16 * np.log(2))
    assert np.allclose(terms["loss"].detach().numpy(), expected, rtol=1e-5)
    assert torch.allclose(model.inverse(model(x).z), x, atol=1e-6)
    assert model.kind == "flow" and "decoder" not in model.provides and model.latent_code(x).shape == x.shape


def test_training_a_flow_minimises_its_nll_and_it_is_measured_by_activation_metrics(
        images: Path, tmp_path: Path, kinds_manager) -> None:
    cfg = TrainConfig(images=str(images), out=str(tmp_path / "flow"), architecture="affine-flow", epochs=3,
                      batch_size=4, image_size=16, lr=0.05, figures=True, val_fraction=0.25)
    from fluency.core.outputs.training_figures import TrainingFigures

    result = training.train(cfg, manager=kinds_manager, observer=TrainingFigures())
    history = pd.DataFrame(result.history)
    assert {"loss", "nll_bpd", "val_nll_bpd"} <= set(history.columns) and "kl" not in history.columns
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert (tmp_path / "flow" / "figures" / "curves.png").exists()
    assert not list((tmp_path / "flow" / "figures").glob("recon-*"))  # a flow has no decoder to draw

    run = fluency.run(metrics=["gini"], checkpoints=[str(result.checkpoint)], images=str(images),
                      out=str(tmp_path / "run"), manager=kinds_manager, progress=False, analyses=[])
    assert set(run.metrics["layer"]) == {"z"} and run.metrics["value"].notna().all()
    latents = pd.read_parquet(tmp_path / "run" / "latents" / "flow.parquet")  # the flow's z, from the same pass
    assert len(latents) == 16 and latents.shape[1] == 1 + 3 * 16 * 16
    assert not list((tmp_path / "run" / "figures").glob("recon-*"))


def test_a_metric_that_requires_a_decoder_names_the_model_without_one(images: Path, tmp_path: Path,
                                                                      kinds_manager) -> None:
    cfg = TrainConfig(images=str(images), out=str(tmp_path / "flow"), architecture="affine-flow", epochs=1,
                      batch_size=8, image_size=16, figures=False)
    checkpoint = training.train(cfg, manager=kinds_manager).checkpoint
    with pytest.raises(FluencyError, match=r"metric 'recon-error' needs a model with a decoder; checkpoint "
                                           r"'flow' is 'affine-flow', a flow model without"):
        fluency.run(metrics=["recon-error"], checkpoints=[str(checkpoint)], images=str(images),
                    out=str(tmp_path / "run"), manager=kinds_manager, progress=False)
    assert not (tmp_path / "run" / "metrics.parquet").exists()
    # sam needs only an objective, which a flow has: its loss is the NLL
    run = fluency.run(metrics=["grad-norm"], checkpoints=[str(checkpoint)], images=str(images),
                      out=str(tmp_path / "ok"), manager=kinds_manager, progress=False, analyses=[])
    assert (run.metrics["value"] > 0).all()


def test_an_encoder_only_model_is_not_trained(images: Path, tmp_path: Path, kinds_manager) -> None:
    cfg = TrainConfig(images=str(images), out=str(tmp_path / "enc"), architecture="conv-encoder", epochs=1,
                      image_size=16, figures=False)
    with pytest.raises(TrainingError, match=r"'conv-encoder' \(encoder\) has no training objective"):
        training.train(cfg, manager=kinds_manager)


def test_requires_is_checked_when_a_metric_registers() -> None:
    with pytest.raises(ValueError, match="requires must be a tuple"):
        MetricSpec("x", lambda: None, needs="model", requires=("wings",)).check()
    with pytest.raises(ValueError, match="needs needs='model'"):
        MetricSpec("x", lambda: None, requires=("decoder",)).check()
