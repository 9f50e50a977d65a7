"""Training constraints ``kl-sparsity``, ``l1-activation`` and ``l1-attention``: known answers, gradients, errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluency.core.errors import FluencyError, OptionError
from fluency.core.plugin.manager import PluginManager
from fluency.plugins.default_kl_sparsity import KLSparsity, kl_bernoulli
from fluency.plugins.default_l1_activation import L1Activation
from fluency.plugins.default_l1_attention import L1Attention

RHO = 0.05
MODEL = SimpleNamespace(default_metric_layers=("a",))


def kl_reference(rho: float, rho_hat: float) -> float:
    """The standard formula in plain floats (independent of the torch implementation)."""
    return rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))


def kl_value(x: torch.Tensor, **options: object) -> float:
    return float(KLSparsity(**{"mapping": "clamp", **options})({"a": x}, MODEL))


# ---------------------------------------------------------------- kl-sparsity


@pytest.mark.parametrize("values, expected", [
    ([0.25, 0.75], 0.4946319372),      # ρ̂ = 0.5
    ([0.005, 0.015], 0.0412910850),    # ρ̂ = 0.01
    ([0.1, 0.3], 0.0939430260),        # ρ̂ = 0.2
    ([0.2, 0.2, 0.2, 0.2], 0.0939430260),
])
def test_kl_sparsity_known_answers(values: list[float], expected: float) -> None:
    x = torch.tensor(values, dtype=torch.float64)[:, None]  # B images × 1 unit, batch mean ρ̂
    assert kl_value(x, rho=RHO) == pytest.approx(expected, abs=1e-9)


def test_kl_sparsity_is_the_standard_formula_not_the_reports() -> None:
    # the report's ρ log ρ version would be negative here; the standard one is 0 at ρ̂ = ρ and > 0 elsewhere
    assert kl_value(torch.full((3, 1), RHO, dtype=torch.float64), rho=RHO) == pytest.approx(0.0, abs=1e-12)
    assert kl_value(torch.full((3, 1), 0.001, dtype=torch.float64), rho=RHO) > 0.1


@settings(max_examples=200, deadline=None)
@given(rho=st.floats(0.001, 0.999), rho_hat=st.floats(0.001, 0.999))
def test_kl_bernoulli_nonnegative_and_zero_at_target(rho: float, rho_hat: float) -> None:
    value = float(kl_bernoulli(rho, torch.tensor([rho_hat], dtype=torch.float64)))
    assert value >= -1e-12
    assert value == pytest.approx(kl_reference(rho, rho_hat), rel=1e-9, abs=1e-12)
    assert float(kl_bernoulli(rho, torch.tensor([rho], dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("mapping, start", [("clamp", 0.3), ("clamp", 0.01), ("sigmoid", 0.0), ("sigmoid", -5.0),
                                            ("tanh", 0.5), ("tanh", 0.01)])
def test_kl_sparsity_gradient_pulls_rho_hat_towards_rho(mapping: str, start: float) -> None:
    param = torch.nn.Parameter(torch.full((8, 3), start, dtype=torch.float64))
    constraint = KLSparsity(rho=RHO, mapping=mapping)
    opt = torch.optim.SGD([param], lr=1e-2)

    def distance() -> float:
        return float((constraint.rho_hat(param.detach()) - RHO).abs().max())

    before = distance()
    opt.zero_grad()
    constraint({"a": param}, MODEL).backward()
    assert param.grad is not None and float(param.grad.abs().sum()) > 0
    opt.step()
    assert distance() < before


def test_kl_sparsity_weight_scales_linearly() -> None:
    x = torch.tensor([[0.1, 0.4], [0.3, 0.2]], dtype=torch.float64)
    base = kl_value(x)
    assert base > 0
    assert kl_value(x, weight=2.5) == pytest.approx(2.5 * base, rel=1e-12)
    assert kl_value(x, weight=0.0) == 0.0
    penalty = float(KLSparsity(mapping="clamp", weight=7.0).penalty({"a": x}, MODEL))
    assert penalty == pytest.approx(base, rel=1e-12)


def _two_channel_example() -> torch.Tensor:
    """B=2, C=2, H=1, W=2: channel 0 has element means 0.03 and 0.07 (channel mean 0.05 = ρ),
    channel 1 has element means 0.2 and 0.2 (channel mean 0.2)."""
    x = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    x[:, 0, 0, 0] = torch.tensor([0.02, 0.04], dtype=torch.float64)
    x[:, 0, 0, 1] = torch.tensor([0.06, 0.08], dtype=torch.float64)
    x[:, 1, 0, 0] = torch.tensor([0.1, 0.3], dtype=torch.float64)
    x[:, 1, 0, 1] = torch.tensor([0.2, 0.2], dtype=torch.float64)
    return x


def test_kl_sparsity_per_channel_vs_per_element() -> None:
    x = _two_channel_example()
    per_element = kl_reference(RHO, 0.03) + kl_reference(RHO, 0.07) + 2 * 0.0939430260
    per_channel = 0.0 + 0.0939430260
    assert kl_value(x, unit="element") == pytest.approx(per_element, abs=1e-9)
    assert kl_value(x, unit="channel") == pytest.approx(per_channel, abs=1e-9)
    assert kl_value(x, unit="element", reduction="mean") == pytest.approx(per_element / 4, abs=1e-9)
    assert kl_value(x, unit="channel", reduction="mean") == pytest.approx(per_channel / 2, abs=1e-9)
    assert per_element > per_channel  # within-channel spread costs only per element


def test_kl_sparsity_sums_layers() -> None:
    a = torch.tensor([[0.25], [0.75]], dtype=torch.float64)
    b = torch.tensor([[0.1], [0.3]], dtype=torch.float64)
    value = float(KLSparsity(mapping="clamp", layers=["a", "b"])({"a": a, "b": b}, MODEL))
    assert value == pytest.approx(0.4946319372 + 0.0939430260, abs=1e-9)


def test_kl_sparsity_mappings() -> None:
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    # sigmoid maps a ReLU zero to 0.5: the penalty's floor on a silent ReLU layer is KL(ρ ‖ 0.5) per unit
    assert float(KLSparsity(rho=RHO, mapping="sigmoid")({"a": zeros}, MODEL)) == pytest.approx(3 * 0.4946319372, abs=1e-9)
    # tanh maps 0 to 0 and tanh(x) = ρ gives ρ̂ = ρ exactly
    x = torch.full((4, 3), math.atanh(RHO), dtype=torch.float64)
    assert float(KLSparsity(rho=RHO, mapping="tanh")({"a": x}, MODEL)) == pytest.approx(0.0, abs=1e-12)
    # a layer silent over the whole batch stays finite (ρ̂ clamped to ε)
    for mapping in ("tanh", "clamp"):
        value = float(KLSparsity(rho=RHO, mapping=mapping)({"a": zeros}, MODEL))
        assert math.isfinite(value) and value == pytest.approx(3 * kl_reference(RHO, 1e-6), rel=1e-6)


def test_kl_sparsity_float32_and_half_inputs_give_the_float64_answer() -> None:
    """Large float32 and bfloat16 activations (tanh saturates; many units' ρ̂ fall below ε and are clamped) give
    the penalty computed in float64 numpy from the same values, to float32 precision: finite and right."""
    import numpy as np

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(16, 4, 5, 5) * 50).to(dtype)
        rho_hat = np.clip(np.tanh(x.double().numpy()).reshape(16, -1).mean(0), 1e-6, 1 - 1e-6)
        expected = sum(kl_reference(RHO, float(r)) for r in rho_hat)
        assert (rho_hat == 1e-6).any() and expected > 1  # the clamp is exercised
        assert float(KLSparsity()({"a": x}, MODEL)) == pytest.approx(expected, rel=1e-5), dtype


@pytest.mark.parametrize("options", [{"rho": 0.0}, {"rho": 1.0}, {"eps": 0.0}, {"mapping": "relu"},
                                     {"unit": "pixel"}, {"reduction": "max"}])
def test_kl_sparsity_rejects_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(OptionError):
        KLSparsity(**options)


def test_missing_layer_is_a_clear_error() -> None:
    with pytest.raises(FluencyError, match=r"\['b'\] were not captured"):
        KLSparsity(layers=["b"])({"a": torch.zeros(2, 2)}, MODEL)
    with pytest.raises(FluencyError, match="not captured"):
        L1Activation(layers=["b"])({"a": torch.zeros(2, 2)}, MODEL)


# ---------------------------------------------------------------- l1-activation


def test_l1_activation_known_answer() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, -4.0]])  # L1 norms 6 and 4 → mean 5
    assert float(L1Activation(normalize=False)({"a": x}, MODEL)) == pytest.approx(5.0)
    assert float(L1Activation()({"a": x}, MODEL)) == pytest.approx(5.0 / 3)  # normalize defaults to true
    assert float(L1Activation(weight=0.5)({"a": x}, MODEL)) == pytest.approx(2.5 / 3)


def test_l1_activation_layers_and_shapes() -> None:
    a = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, -4.0]])
    b = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2)  # image norms 28 and 92 → mean 60, 8 units
    acts = {"a": a, "b": b}
    assert float(L1Activation(layers=["a", "b"], normalize=False)(acts, MODEL)) == pytest.approx(65.0)
    assert float(L1Activation(layers=["a", "b"])(acts, MODEL)) == pytest.approx(5.0 / 3 + 60.0 / 8)
    assert L1Activation().layers(MODEL) == ["a"]  # the model's metric layers by default


def test_l1_activation_gradient_shrinks_activations() -> None:
    param = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    L1Activation()({"a": param}, MODEL).backward()
    assert torch.equal(param.grad, torch.sign(param.detach()) / 4)  # d/dx mean_b Σ|x|/N = sign(x) / (B·N)


# ---------------------------------------------------------------- l1-attention


ATT_MODEL = SimpleNamespace(default_metric_layers=("enc1",), attention_layers=lambda: ["att3", "att4"])


def test_l1_attention_known_answer_on_attention_layers() -> None:
    acts = {"att3": torch.tensor([[0.2, 0.3], [0.5, 0.9]]),       # norms 0.5, 1.4 → 0.95
            "att4": torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3]]),  # norms 0.3, 0.9 → 0.6
            "enc1": torch.full((2, 4), 100.0)}
    constraint = L1Attention()
    assert constraint.layers(ATT_MODEL) == ["att3", "att4"]
    assert float(constraint(acts, ATT_MODEL)) == pytest.approx(0.95 + 0.6)
    assert float(L1Attention(layers=["att3"], weight=2.0)(acts, ATT_MODEL)) == pytest.approx(1.9)
    assert float(L1Attention(normalize=True)(acts, ATT_MODEL)) == pytest.approx(0.95 / 2 + 0.6 / 3)


def test_l1_attention_needs_attention() -> None:
    for model in (MODEL, SimpleNamespace(default_metric_layers=("a",), attention_layers=lambda: [])):
        with pytest.raises(FluencyError, match=r"attention.*-o 'vae-small\.attention=\[enc3\]' --constraint l1-attention"):
            L1Attention().layers(model)
    with pytest.raises(FluencyError, match=r"\['enc1'\] are not attention layers"):
        L1Attention(layers=["enc1"]).layers(ATT_MODEL)


def test_l1_attention_trains_a_real_model_with_attention(manager: PluginManager) -> None:
    from fluency.core.model.capture import capture_activations

    spec = manager.get("architecture", "vae-small")
    options = spec.resolve(manager.option_defaults("architecture", "vae-small"),
                           {"attention": ["enc3"], "image_size": 32})
    torch.manual_seed(0)
    model = spec.load()(**options)
    constraint = L1Attention()
    layers = constraint.layers(model)
    assert layers == list(model.attention_layers()) and layers
    with capture_activations(model, layers, detach=False) as acts:
        model(torch.rand(2, *model.input_shape))
    constraint(acts, model).backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert any(".mlp." in n for n in reached)  # the penalty reaches the attention MLP (captured without detaching)
    assert not any(n.startswith(("mu.", "logvar.", "decoder.")) for n in reached)  # and nothing after it
    plain = spec.load()(**spec.resolve(manager.option_defaults("architecture", "vae-small"), {"image_size": 32}))
    with pytest.raises(FluencyError, match="attention"):
        constraint.layers(plain)


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("name, cls, defaults", [
    ("kl-sparsity", KLSparsity, {"rho": 0.05, "weight": 1.0, "layers": None, "mapping": "tanh", "eps": 1e-6,
                                 "unit": "element", "reduction": "sum"}),
    ("l1-activation", L1Activation, {"weight": 1.0, "layers": None, "normalize": True}),
    ("l1-attention", L1Attention, {"weight": 1.0, "layers": None, "normalize": False}),
])
def test_constraints_resolve_through_the_plugin_manager(name: str, cls: type, defaults: dict[str, object]) -> None:
    manager = PluginManager(autoload=False)
    spec = manager.get("constraint", name)
    assert spec.kind == "constraint" and spec.summary
    options = spec.resolve(manager.option_defaults("constraint", name))
    assert options == defaults
    constraint = spec.load()(**options)
    assert type(constraint) is cls
    with pytest.raises(OptionError):
        spec.resolve({"weight": "heavy"})


def test_kl_sparsity_option_bounds_through_resolve() -> None:
    spec = PluginManager(autoload=False).get("constraint", "kl-sparsity")
    with pytest.raises(OptionError):
        spec.resolve({"rho": 1.5})
    with pytest.raises(OptionError):
        spec.resolve({"mapping": "softplus"})
    assert KLSparsity(**spec.resolve({"rho": 0.1, "unit": "channel"})).rho == 0.1


def test_kl_sparsity_docstring_names_the_default_mapping() -> None:
    import fluency.plugins.default_kl_sparsity as module

    default = PluginManager(autoload=False).get("constraint", "kl-sparsity").options["mapping"].default
    assert default == KLSparsity().mapping == "tanh"
    doc = module.__doc__
    assert f"``{default}`` (default" in doc and not any(f"``{m}`` (default" in doc for m in ("sigmoid", "clamp"))
