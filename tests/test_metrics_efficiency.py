"""Hoyer, reconstruction error, ELBO terms, gradient norm, LPIPS and image statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluency.core.plugin.architecture import VAEOutput
from fluency.core.model.losses import loss_from_config
from fluency.core.plugin.architecture import kl_divergence
from fluency.core.plugin.metric import MetricBatch
from fluency.plugins.default_hoyer import Hoyer, hoyer
from fluency.plugins.default_image_stats import ImageStats, spectral_slope
from fluency.plugins.default_recon_error import ELBO, ReconError
from fluency.plugins.default_sam import GradNorm, SAMSharpness
from fluency.plugins.default_vae_small import VAESmall

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights"
EXAMPLES = SHARED / "datasets" / "lpips-examples"


def h(values) -> float:
    return float(hoyer(torch.tensor([values], dtype=torch.float64))[0])


def test_hoyer_known_answers_and_no_cloning() -> None:
    assert h([0, 0, 5, 0]) == pytest.approx(1.0)
    assert h([2, 2, 2, 2]) == pytest.approx(0.0, abs=1e-12)
    assert h([1, 2, 3, 4]) == pytest.approx(0.1742581416, abs=1e-9)
    assert h([0, 0, 0]) == 0.0
    assert h([0, 0, 1, 3]) != pytest.approx(h([0, 0, 1, 3, 0, 0, 1, 3]))  # Hoyer fails Cloning
    acts = {"enc1": torch.rand(3, 4, 5, 5)}
    batch = MetricBatch(["a", "b", "c"], torch.zeros(3, 3, 8, 8), acts)
    (v,) = Hoyer(layers=["enc1"]).compute(batch)
    assert np.allclose(v.as_numpy(), hoyer(acts["enc1"].flatten(1)).numpy())
    (c,) = Hoyer(layers=["enc1"], per="channel").compute(batch)
    assert np.allclose(c.as_numpy(), hoyer(acts["enc1"].reshape(12, 25)).view(3, 4).mean(1).numpy())


class Shifted(torch.nn.Module):
    """A stand-in model whose reconstruction is the image plus a constant."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x, sample=True):
        mu = torch.zeros(x.shape[0], 2)
        return VAEOutput((x + self.shift).clamp(0, 1), mu, mu, mu)


def test_recon_error_known_answers() -> None:
    x = torch.full((2, 3, 16, 16), 0.5)
    batch = MetricBatch(["a", "b"], x, model=Shifted(0.1))
    values = {v.metric: v.as_numpy() for v in ReconError(kinds=["l1", "l2", "ssim"]).compute(batch)}
    assert np.allclose(values["recon-l1"], 0.1) and np.allclose(values["recon-l2"], 0.01)
    same = {v.metric: v.as_numpy() for v in ReconError(kinds=["ssim"]).compute(MetricBatch(["a", "b"], x,
                                                                                           model=Shifted(0.0)))}
    assert np.allclose(same["recon-ssim"], 0.0, atol=1e-6) and (values["recon-ssim"] > 0).all()


def test_elbo_terms_add_up() -> None:
    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=8).eval()
    x = torch.rand(3, 3, 32, 32)
    loss = loss_from_config(model, {"terms": [{"name": "l2", "weight": 1.0}], "beta": 0.5})
    values = {v.metric: v.as_numpy() for v in ELBO().compute(MetricBatch(["a", "b", "c"], x, model=model, loss=loss))}
    out = model(x, sample=False)
    kl = kl_divergence(out.mu, out.logvar).detach().double().numpy()
    recon = (out.recon - x).pow(2).flatten(1).sum(1).detach().double().numpy()
    assert np.allclose(values["elbo-kl"], kl, rtol=1e-5) and np.allclose(values["elbo-recon"], recon, rtol=1e-5)
    assert np.allclose(values["elbo"], recon + 0.5 * kl, rtol=1e-5)


def test_grad_norm_and_small_rho_sharpness() -> None:
    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=8).double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    batch = MetricBatch(["a", "b", "c"], x, model=model, loss=loss_from_config(model, {}))
    (g,) = GradNorm(parameters="all").compute(batch)
    (s,) = SAMSharpness(rho=1e-5, method="loop").compute(batch)
    assert np.allclose(s.as_numpy(), 1e-5 * g.as_numpy(), rtol=1e-3)
    x0 = x[:1]
    loss = loss_from_config(model, {})(model(x0, sample=False), x0).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert g.as_numpy()[0] == pytest.approx(float(torch.sqrt(sum((q ** 2).sum() for q in grads))), rel=1e-10)


def _example(name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(EXAMPLES / name).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


@pytest.mark.skipif(not (WEIGHTS / "vgg16_imagenet_features.pth").exists() or not EXAMPLES.exists(),
                    reason="shared offline LPIPS weights or example images not present")
@pytest.mark.parametrize("net, file, expected", [("alex", "alexnet_imagenet_features.pth", (0.722, 0.138)),
                                                 ("vgg", "vgg16_imagenet_features.pth", (0.569, 0.422))])
def test_lpips_reproduces_the_published_values(net, file, expected) -> None:
    pytest.importorskip("lpips")
    from fluency.core.model.backbones import lpips_model

    model = lpips_model(net, WEIGHTS / file)
    ref, p0, p1 = (_example(f) for f in ("ex_ref.png", "ex_p0.png", "ex_p1.png"))
    got = [float(model(ref, p, normalize=True)) for p in (p0, p1)]
    assert got == pytest.approx(list(expected), abs=5e-4)
    assert float(model(ref * 2 - 1, p0 * 2 - 1)) == pytest.approx(got[0], abs=1e-6)  # normalize=True ≡ [-1, 1]


def test_lpips_properties_with_a_random_backbone(tmp_path: Path) -> None:
    pytest.importorskip("lpips")
    from fluency.core.model.backbones import lpips_model
    from fluency.plugins.default_lpips import LPIPSMetric

    torch.manual_seed(0)
    feats = {f"features.{i}.{k}": torch.randn(*shape) * 0.05 for i, (co, ci, ks) in
             {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}.items()
             for k, shape in (("weight", (co, ci, ks, ks)), ("bias", (co,)))}
    torch.save(feats, tmp_path / "alex.pth")
    net = lpips_model("alex", tmp_path / "alex.pth")
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.allclose(net(a, a, normalize=True).flatten(), torch.zeros(2), atol=1e-7)
    assert torch.allclose(net(a, b, normalize=True), net(b, a, normalize=True), atol=1e-6)
    assert (net(a, b, normalize=True) >= 0).all()
    metric = LPIPSMetric(net="alex", weights=str(tmp_path / "alex.pth"), samples=0)
    (v,) = metric.compute(MetricBatch(["a", "b"], a, model=Shifted(0.0)))
    assert np.allclose(v.as_numpy(), 0.0, atol=1e-7)
    # with sampled z, each image's draws depend on the seed and its id, not on the batch it is in
    from fluency.plugins.default_vae_small import VAESmall

    vae = VAESmall(image_size=64, latent_dim=4, channels=[4, 4, 4, 4, 4], decoder_channels=[4, 4, 4, 4, 4]).eval()
    sampled = LPIPSMetric(net="alex", weights=str(tmp_path / "alex.pth"), samples=2)
    with torch.no_grad():
        (both,) = sampled.compute(MetricBatch(["a", "b"], a, model=vae, seed=3))
        (second,) = sampled.compute(MetricBatch(["b"], a[1:], model=vae, seed=3))
    assert np.allclose(second.as_numpy(), both.as_numpy()[1:], atol=1e-6)


def test_lpips_without_weights_says_where_to_put_them(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("lpips")
    import urllib.error

    from fluency.core.model.backbones import lpips_model
    from fluency.core.errors import FluencyError

    monkeypatch.delenv("FLUENCY_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FluencyError, match=r"alexnet-owt-7be5be79\.pth.*FLUENCY_LPIPS_WEIGHTS"):
        lpips_model("alex")


def test_image_stats() -> None:
    flat = torch.full((1, 3, 64, 64), 0.5)
    rng = np.random.default_rng(0)
    # pink noise: amplitude ∝ 1/f has spectral slope -1
    f = np.sqrt(np.fft.fftfreq(64)[:, None] ** 2 + np.fft.fftfreq(64)[None, :] ** 2)
    f[0, 0] = 1
    pink = np.real(np.fft.ifft2(np.exp(2j * np.pi * rng.random((64, 64))) / f))
    pink = (pink - pink.min()) / (pink.max() - pink.min())
    images = torch.cat([flat, torch.from_numpy(pink).float().expand(1, 3, 64, 64)])
    stats = {v.metric: v.as_numpy() for v in ImageStats().compute(MetricBatch(["flat", "pink"], images))}
    assert stats["luminance"][0] == pytest.approx(0.5, abs=1e-6)
    assert stats["rms-contrast"][0] == pytest.approx(0.0, abs=1e-6) and stats["rms-contrast"][1] > 0.05
    assert stats["edge-density"][0] == 0.0
    assert stats["jpeg-bpp"][1] > stats["jpeg-bpp"][0]
    assert float(spectral_slope(torch.from_numpy(pink)[None])) == pytest.approx(-1.0, abs=0.25)


def test_attention_l1_reads_the_attention_layers_and_refuses_models_without() -> None:
    from fluency.core.model.capture import capture_activations
    from fluency.core.errors import FluencyError
    from fluency.plugins.default_attention_l1 import AttentionL1

    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=8, attention=["enc3", "enc5"]).eval()
    metric = AttentionL1()
    layers = metric.layers(model)
    assert layers == ["att3", "att5"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), capture_activations(model, layers) as acts:
        model(x, sample=False)
    values = {v.layer: v.as_numpy() for v in metric.compute(MetricBatch(["a", "b"], x, acts, model=model))}
    assert np.allclose(values["att3"], acts["att3"].abs().sum(1).numpy())
    assert ((values["att5"] > 0) & (values["att5"] < acts["att5"].shape[1])).all()  # sigmoid weights in (0, 1)
    with pytest.raises(FluencyError, match="no attention layers"):
        AttentionL1().layers(VAESmall(image_size=32))


def test_attention_l1_declares_lower_as_more_fluent() -> None:
    """The study expects attention-l1 to fall with beauty: a negative correlation supports fluency."""
    from fluency.core.outputs.summary import supports_fluency
    from fluency.core.plugin.manager import PluginManager

    spec = PluginManager(autoload=False).get("metric", "attention-l1")
    assert spec.higher_is_more_fluent is False
    assert supports_fluency(-0.3, spec.higher_is_more_fluent) == "yes"
    assert supports_fluency(+0.3, spec.higher_is_more_fluent) == "no"
