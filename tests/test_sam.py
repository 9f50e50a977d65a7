"""SAM sharpness: the quadratic known answer, ASAM's formula, and an independent per-image loop on vae-small."""

from __future__ import annotations

import math

import pytest
import torch

from fluency.core.errors import FluencyError
from fluency.core.model.losses import loss_from_config
from fluency.core.plugin.architecture import kl_divergence
from fluency.core.plugin.metric import MetricBatch
from fluency.plugins.default_sam import SAMSharpness, sam_perturbation, sharpness
from fluency.plugins.default_vae_small import VAESmall

A = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
W0 = [1.0, -1.0, 0.5]


def quadratic(w: torch.Tensor, scale: float = 1.0):
    return lambda: scale * 0.5 * (A * w * w).sum()


def test_quadratic_known_answer() -> None:
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    s, gnorm = sharpness(quadratic(w), [w], rho=0.05)
    assert s == pytest.approx(0.3134608703, abs=1e-9)
    assert gnorm == pytest.approx(math.sqrt(1 + 16 + 4.5**2))
    assert w.tolist() == W0  # weights restored exactly


def test_scaling_the_loss_scales_sharpness() -> None:
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    s1, _ = sharpness(quadratic(w), [w], rho=0.05)
    s3, _ = sharpness(quadratic(w, 3.0), [w], rho=0.05)
    assert s3 == pytest.approx(3 * s1, rel=1e-12)


def test_small_rho_sharpness_is_rho_times_gradient_norm() -> None:
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    s, gnorm = sharpness(quadratic(w), [w], rho=1e-6)
    assert s == pytest.approx(1e-6 * gnorm, rel=1e-4)


def test_perturbation_formulas() -> None:
    w = torch.tensor(W0, dtype=torch.float64)
    g = A * w
    (eps,) = sam_perturbation([w], [g], rho=0.05)
    assert torch.allclose(eps, 0.05 * g / g.norm())
    (eps,) = sam_perturbation([w], [g], rho=0.5, adaptive=True)
    assert torch.allclose(eps, 0.5 * w**2 * g / (w.abs() * g).norm())


def test_kl_known_answer() -> None:
    """REFERENCE.md prints 1.5518085957; summing its formula by hand gives 1.5518085558
    (−½[(1+0−0.25−1) + (1+1−1−e) + (1−2−0−e⁻²)]), so the printed 8th digit is a typo."""
    mu = torch.tensor([[0.5, -1.0, 0.0]], dtype=torch.float64)
    lv = torch.tensor([[0.0, 1.0, -2.0]], dtype=torch.float64)
    by_hand = -0.5 * ((1 + 0 - 0.25 - 1) + (1 + 1 - 1 - math.e) + (1 - 2 - 0 - math.exp(-2)))
    assert float(kl_divergence(mu, lv)) == pytest.approx(by_hand, abs=1e-12)
    assert float(kl_divergence(mu, lv)) == pytest.approx(1.5518085957, abs=1e-7)


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=8).double().eval()
    images = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    return model, MetricBatch([f"i{k}" for k in range(5)], images, model=model, loss=loss_from_config(model, {"beta": 1.0}))


def independent_loop(model, images, rho, terms="loss"):
    """Per-image sharpness written out plainly, sharing no code with the plugin."""
    out = []
    params = list(model.parameters())
    for i in range(images.shape[0]):
        x = images[i:i + 1]

        def loss():
            o = model(x, sample=False)
            recon = ((o.recon - x) ** 2).sum()
            kl = -0.5 * (1 + o.logvar - o.mu**2 - o.logvar.exp()).sum()
            return {"loss": recon + kl, "recon": recon, "kl": kl}[terms]

        model.zero_grad()
        base = loss()
        base.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            old = [p.clone() for p in params]
            for p, g in zip(params, grads):
                p += rho * g / (norm + 1e-12)
            moved = loss()
            for p, o in zip(params, old):
                p.copy_(o)
        out.append(float(moved - base.detach()))
    model.zero_grad()
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_metric_matches_an_independent_loop_on_vae_small(model_and_batch, method) -> None:
    model, batch = model_and_batch
    expected = independent_loop(model, batch.images, 0.05)
    (values,) = SAMSharpness(rho=0.05, method=method, chunk_size=2).compute(batch)
    assert values.metric == "sam" and values.layer is None
    torch.testing.assert_close(torch.as_tensor(values.values), expected, rtol=1e-7, atol=1e-9)


def test_metric_leaves_the_model_unchanged_and_is_deterministic(model_and_batch) -> None:
    model, batch = model_and_batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = SAMSharpness(rho=0.05).compute(batch)[0].as_numpy()
    second = SAMSharpness(rho=0.05).compute(batch)[0].as_numpy()
    assert (first == second).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_encoder_only_perturbs_fewer_weights(model_and_batch) -> None:
    model, batch = model_and_batch
    full = SAMSharpness(rho=0.05).compute(batch)[0].as_numpy()
    enc = SAMSharpness(rho=0.05, parameters="encoder").compute(batch)[0].as_numpy()
    assert (enc > 0).all() and not (enc == full).all()


@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize("terms", ["recon", "kl"])
def test_terms_option_measures_the_sharpness_of_one_loss_term(model_and_batch, method, terms) -> None:
    model, batch = model_and_batch
    expected = independent_loop(model, batch.images, 0.05, terms)
    (values,) = SAMSharpness(rho=0.05, method=method, terms=terms, chunk_size=2).compute(batch)
    torch.testing.assert_close(torch.as_tensor(values.values), expected, rtol=1e-7, atol=1e-9)
    total = independent_loop(model, batch.images, 0.05, "loss")
    assert not torch.allclose(expected, total)


def test_kl_sharpness_does_not_depend_on_the_decoder(model_and_batch) -> None:
    """The KL term reads only the encoder, so perturbing the whole model or the encoder alone agree."""
    _, batch = model_and_batch
    whole = SAMSharpness(rho=0.05, terms="kl").compute(batch)[0].as_numpy()
    encoder = SAMSharpness(rho=0.05, terms="kl", parameters="encoder").compute(batch)[0].as_numpy()
    assert whole == pytest.approx(encoder, rel=1e-9, abs=1e-12)


def test_a_term_needs_a_loss_with_parts(model_and_batch) -> None:
    model, batch = model_and_batch
    plain = MetricBatch(batch.image_ids, batch.images, model=model, loss=lambda out, x: ((out.recon - x) ** 2).flatten(1).sum(1))
    assert SAMSharpness(rho=0.05).compute(plain)[0].as_numpy().shape == (5,)
    with pytest.raises(FluencyError, match="terms='kl' needs a loss with .parts"):
        SAMSharpness(rho=0.05, terms="kl").compute(plain)


def test_auto_takes_the_batched_path_on_the_cpu_only_when_a_chunk_fits(model_and_batch, monkeypatch) -> None:
    from fluency.plugins import default_sam

    _, batch = model_and_batch
    taken: list[str] = []
    for name in ("_loop", "_vmap"):
        original = getattr(SAMSharpness, name)
        monkeypatch.setattr(SAMSharpness, name, lambda self, b, _o=original, _n=name: (taken.append(_n), _o(self, b))[1])
    auto = SAMSharpness(rho=0.05, method="auto", chunk_size=4).compute(batch)[0].as_numpy()
    monkeypatch.setattr(default_sam, "VMAP_CPU_BYTES", 0)
    fallback = SAMSharpness(rho=0.05, method="auto", chunk_size=4).compute(batch)[0].as_numpy()
    assert taken == ["_vmap", "_loop"]
    assert auto == pytest.approx(fallback, rel=1e-7, abs=1e-9)
