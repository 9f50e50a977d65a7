"""glow-small as a flow: exact inverse, log-determinant against a brute-force Jacobian, the likelihood and the
objective computed independently, dequantisation in training mode only, and a rebuild from a state dict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fluency.api import ObjectiveSettings, capture_activations
from scipy import stats

from fluency_flows.model import BINS, GlowSmall


def images(n: int, size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random images in [0, 1] with some pixels exactly 0 and 1 (the edges of the logit's range)."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[:, :, 0, 0], x[:, :, -1, -1] = 0.0, 1.0
    return x


def randomise(model: GlowSmall, seed: int, scale: float = 0.1) -> GlowSmall:
    """Perturb every weight (the zero-initialised coupling outputs too) and mark actnorm initialised: a generic,
    well-conditioned invertible map with random actnorm, rather than the near-identity of a fresh Glow.
    Convolution weights get noise of sd ``scale``/√fan-in, the others (actnorm, LU factors, biases) ``scale``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            sd = scale / math.sqrt(p[0].numel()) if name.endswith("weight") else scale
            p.add_(sd * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buffer in model.named_buffers():
            if name.endswith("data_dep_init_done"):
                buffer.fill_(1.0)
    return model


def actnorm_initialised(model: GlowSmall) -> list[bool]:
    return [bool(b > 0) for n, b in model.named_buffers() if n.endswith("data_dep_init_done")]


@pytest.mark.parametrize("init", ["data-dependent", "random"])
def test_images_come_back_from_their_latent(init: str) -> None:
    torch.manual_seed(0)
    model = GlowSmall()  # the default options: 32×32, 2 levels, 4 steps, 64 hidden channels
    x = images(4, 32)
    if init == "random":
        randomise(model, seed=1)
    assert all(actnorm_initialised(model)) == (init == "random")
    model.eval()
    with torch.no_grad():
        out = model(x)  # the first pass initialises actnorm from this batch when it is not yet initialised
        back = model.inverse(out.z)
    assert all(actnorm_initialised(model))
    error = (back - x).abs().max().item()
    print(f"x -> z -> x, {init} init: max |error| = {error:.2e}")
    assert error < 1e-4
    assert out.z.shape == (4, 3 * 32 * 32) and out.dims == 3 * 32 * 32


def test_actnorm_initialisation_standardises_its_first_batch() -> None:
    torch.manual_seed(0)
    model = GlowSmall(image_size=16, levels=2, steps=1, hidden_channels=8).eval()
    with torch.no_grad(), capture_activations(model, ["scale1"]) as acts:
        model(images(8, 16, seed=3))
    # one step = actnorm, 1×1 conv (orthogonal at init), coupling (near identity: scale sigmoid(2))
    per_channel = acts["scale1"].transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.2 and (per_channel.std(1) - 1).abs().max() < 0.3


@pytest.mark.parametrize(("levels", "steps"), [(1, 1), (2, 2)])
def test_log_det_and_likelihood_against_the_brute_force_jacobian(levels: int, steps: int) -> None:
    torch.manual_seed(levels)
    model = randomise(GlowSmall(image_size=4, levels=levels, steps=steps, hidden_channels=8).double(), seed=2)
    model.eval()
    x = images(1, 4, seed=4, dtype=torch.float64)
    x[0, 1, 2, 1] = 0.999  # inside the range: the Jacobian of the whole map, logit included

    def to_latent(v: torch.Tensor) -> torch.Tensor:
        return model.latent_and_log_det(v.view(1, 3, 4, 4))[0].flatten()

    jacobian = torch.autograd.functional.jacobian(to_latent, x.flatten())
    sign, brute = torch.linalg.slogdet(jacobian)
    z, log_det = model.latent_and_log_det(x)
    print(f"levels {levels}, steps {steps}: log|det J| brute force {brute.item():.10f}, "
          f"model {log_det.item():.10f}, difference {abs(brute - log_det).item():.1e}")
    assert sign != 0 and abs(brute.item() - log_det.item()) < 1e-6

    out = model(x)
    d = 3 * 4 * 4
    expected = stats.norm.logpdf(z.detach().numpy()).sum() + brute.item() - d * math.log(256)
    assert out.dims == d and out.log_likelihood.item() == pytest.approx(expected, abs=1e-6)


def test_the_objective_is_the_nll_in_bits_per_dimension() -> None:
    torch.manual_seed(0)
    model = randomise(GlowSmall(image_size=8, levels=2, steps=2, hidden_channels=16), seed=5).eval()
    x = images(3, 8)
    out = model(x)
    terms = model.objective(out, x, ObjectiveSettings())
    z, log_det = model.latent_and_log_det(x)
    log_px = stats.norm.logpdf(z.detach().double().numpy()).sum(1) + log_det.detach().double().numpy()
    expected = -(log_px - 192 * np.log(BINS)) / (192 * np.log(2))
    assert np.allclose(terms["loss"].detach().numpy(), expected, rtol=1e-5)
    assert torch.equal(terms["loss"], terms["nll_bpd"]) and terms["loss"].shape == (3,)


def test_dequantisation_noise_only_in_training_mode() -> None:
    torch.manual_seed(0)
    model = randomise(GlowSmall(image_size=8, levels=2, steps=2, hidden_channels=16), seed=6)
    x = images(4, 8)
    with torch.no_grad():
        model.train()
        first, second = model(x), model(x)
        back = model.inverse(first.z)  # the dequantised image, minus the eval offset 0.5/256
        model.eval()
        eval_a, eval_b = model(x), model(x)
    assert not torch.equal(first.z, second.z) and torch.equal(eval_a.z, eval_b.z)
    assert torch.equal(eval_a.log_likelihood, eval_b.log_likelihood)
    shift = (back - x).abs()
    assert shift.max() <= 0.5 / BINS + 1e-5 and shift.mean() > 0.15 / BINS  # E|u − ½|/256 = 0.25/256


def test_layers_are_tensors_named_per_scale_and_step() -> None:
    model = GlowSmall(image_size=16, levels=3, steps=2, hidden_channels=8).eval()
    layers = model.hookable_layers()
    assert list(layers) == ["scale1.step1", "scale1", "scale2.step1", "scale2", "scale3.step1", "scale3", "z"]
    assert model.default_metric_layers == ("scale1", "scale2", "scale3") and model.input_shape == (3, 16, 16)
    with torch.no_grad(), capture_activations(model, list(layers)) as acts:
        out = model(images(2, 16))
    shapes = {name: tuple(t.shape) for name, t in acts.items()}
    assert shapes == {"scale1.step1": (2, 12, 8, 8), "scale1": (2, 12, 8, 8), "scale2.step1": (2, 24, 4, 4),
                      "scale2": (2, 24, 4, 4), "scale3.step1": (2, 48, 2, 2), "scale3": (2, 48, 2, 2),
                      "z": (2, 768)}
    assert torch.equal(acts["z"], out.z)
    assert model.encoder_parameters().keys() == dict(model.named_parameters()).keys()


def test_rebuilt_from_options_and_state_dict_gives_the_same_values() -> None:
    torch.manual_seed(0)
    model = GlowSmall(image_size=8, levels=2, steps=2, hidden_channels=16)
    x = images(4, 8)
    model(x)  # actnorm initialised (training mode)
    torch.manual_seed(1)  # other random 1×1 convolutions and permutations, overwritten by the state dict
    rebuilt = GlowSmall(**model.options)
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        a, b = model(x), rebuilt(x)
    assert torch.equal(a.z, b.z) and torch.equal(a.log_likelihood, b.log_likelihood)
