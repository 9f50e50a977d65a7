"""The plugin contract kit ``fluency.testing``: every built-in plugin passes it, and broken plugins fail it.

The first tests are what a third-party plugin's suite does with the kit; the parametrized one runs it on
every built-in plugin of every kind, listed by the plugin manager. The rest break one rule each in a fake
plugin and check that the kit fails with a message naming the plugin and the rule.
"""

from __future__ import annotations

import importlib
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fluency.api import (RESULT_COLUMNS, Analysis, AnalysisSpec, ArchitectureSpec, Constraint, ConstraintSpec,
                         EncoderOutput, FlowOutput, FluencyEncoder, FluencyFlow, FluencyMetric, MetricSpec,
                         MetricValues, OptimizerSpec, Option, get_plugin_manager, hookimpl)
from fluency.testing import (check_analysis, check_architecture, check_constraint, check_metric, check_optimizer,
                             check_options, check_plugin, check_registration, synthetic_analysis_data,
                             synthetic_images, tiny_model)

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
KINDS = ("architecture", "constraint", "optimizer", "metric", "analysis")
TINY_VGG = {"image_size": 32, "width": 0.125, "decoder_channels": [32, 32, 16, 16, 8], "latent_dim": 8}
#: built-ins that need options to be checked in seconds, or at all (the kit's defaults are their own otherwise)
OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("architecture", "vae-vgg16"): TINY_VGG,          # 128 px and full VGG width by default
    ("architecture", "vae-vgg19"): TINY_VGG,
    ("architecture", "vae-small"): {"image_size": 32},
    ("architecture", "vgg16-imagenet"): {"size": 32, "weights": str(SHARED_WEIGHTS / "vgg16_imagenet_features.pth")},
    ("architecture", "alexnet-imagenet"): {"size": 64, "weights": str(SHARED_WEIGHTS / "alexnet_imagenet_features.pth")},
    ("architecture", "vgg19-imagenet"): {"size": 32},  # weights: random, written by the test (none are shared)
    ("metric", "decoderless"): {"steps": 5},           # 200 Adam steps by default
    ("analysis", "ridge"): {"permutations": 20, "repeats": 2},  # 200 permutations × 10 repeats by default
    ("analysis", "partial"): {"covariates": ["covariate"]},     # refuses to run without covariates
}
#: kit settings for the slowest metrics: fewer images (still two batch sizes and a batch of one); data for analyses
SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("metric", "sam"): {"n_images": 6, "batch_sizes": (3, 1)},
    ("metric", "grad-norm"): {"n_images": 6, "batch_sizes": (3, 1)},
    ("metric", "lpips"): {"n_images": 6, "batch_sizes": (3, 1)},
    ("metric", "decoderless"): {"n_images": 6, "batch_sizes": (3, 1)},
    ("analysis", "paired"): {"data": synthetic_analysis_data(checkpoints=("a", "b"))},  # compares checkpoints
}


def builtins() -> list[tuple[str, str]]:
    """(kind, name) of every built-in plugin, as the plugin manager lists them."""
    return [(r.kind, r.name) for r in get_plugin_manager().list() if r.package == "fluency" and r.kind is not None]


def builtin_modules() -> list[str]:
    """The modules that register the built-in plugins."""
    return sorted({r.plugin for r in get_plugin_manager().list() if r.package == "fluency"})


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shared offline AlexNet features for LPIPS, else a seeded random backbone (the contract does not depend
    on trained weights; the published values are checked in test_metrics_efficiency)."""
    pytest.importorskip("lpips", reason="the lpips package is not installed: the lpips metric cannot be checked")
    shared = SHARED_WEIGHTS / "alexnet_imagenet_features.pth"
    if shared.exists():
        return str(shared)
    generator = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    feats = {f"features.{i}.{k}": torch.randn(*shape, generator=generator) * 0.05 for i, (co, ci, ks) in shapes.items()
             for k, shape in (("weight", (co, ci, ks, ks)), ("bias", (co,)))}
    path = tmp_path_factory.mktemp("lpips") / "alexnet_random_features.pth"
    torch.save(feats, path)
    return str(path)


# -- a third-party plugin's whole contract test -----------------------------------------------------


class MeanActivation(FluencyMetric):
    """Mean activation of each layer (the docs' example plugin, reduced)."""

    def compute(self, batch):
        return [MetricValues("mean-activation", batch.activations[n].flatten(1).mean(1) * self.options["scale"], n)
                for n in self.batch_layers(batch)]


class ThirdParty:
    """A plugin object as a third-party package would register it."""

    @hookimpl
    def fluency_register_metrics(self):
        return [MetricSpec(name="mean-activation", factory=MeanActivation, description="Mean activation.",
                           options={"layers": Option("list[str]"), "scale": Option("float", 1.0)})]


def test_a_third_party_plugin_checks_its_contract_in_two_lines() -> None:
    for spec in check_registration(ThirdParty(), "third-party"):
        values = check_plugin(spec, {"scale": 2.0})
        assert set(values) == {("mean-activation", f"enc{i}") for i in range(1, 6)}
        assert all(v.shape == (14,) and np.isfinite(v).all() for v in values.values())


def test_every_kind_has_built_ins_and_check_plugin_refuses_what_is_not_a_spec() -> None:
    assert {kind for kind, _ in builtins()} == set(KINDS)
    with pytest.raises(AssertionError, match=r"is not a fluency spec"):
        check_plugin(MeanActivation())


# -- every built-in passes ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, name", builtins(), ids=[f"{k}-{n}" for k, n in builtins()])
def test_every_builtin_plugin_passes_the_kit(kind: str, name: str, request: pytest.FixtureRequest) -> None:
    spec = get_plugin_manager().get(kind, name)
    options = dict(OPTIONS.get((kind, name), {}))
    if (kind, name) == ("metric", "lpips"):
        options["weights"] = request.getfixturevalue("lpips_weights")
    if (kind, name) == ("architecture", "vgg19-imagenet"):
        import torchvision

        options["weights"] = str(request.getfixturevalue("tmp_path") / "vgg19.pth")
        torch.save(torchvision.models.vgg19(weights=None).features.state_dict(), options["weights"])
    elif name.endswith("-imagenet") and not Path(options["weights"]).is_file():
        pytest.skip(f"{options['weights']} is absent (offline ImageNet weights, see shared/weights/README.md)")
    check_plugin(spec, options, **SETTINGS.get((kind, name), {}))


@pytest.mark.parametrize("module", builtin_modules())
def test_every_builtin_module_registers_cleanly(module: str) -> None:
    specs = check_registration(importlib.import_module(module))
    assert specs and all(s.kind in KINDS for s in specs)


# -- broken plugins fail, naming the plugin and the rule ------------------------------------------------


def metric(name: str, factory: Any, **fields: Any) -> MetricSpec:
    return MetricSpec(name=name, factory=factory, description=f"{name} (a broken test metric).",
                      options={"layers": Option("list[str]", ["enc5"])}, **fields)


class BatchMean(FluencyMetric):
    """Each image's mean minus the batch's: depends on which images share the batch."""

    def compute(self, batch):
        m = batch.activations["enc5"].flatten(1).mean(1)
        return [MetricValues("batch-mean", m - m.mean(), "enc5")]


class Drifting(FluencyMetric):
    """Different values on every run: an unseeded generator of its own."""

    rng = np.random.default_rng()

    def compute(self, batch):
        return [MetricValues("drifting", self.rng.normal(size=len(batch.image_ids)), "enc5")]


class LeavesHook(FluencyMetric):
    """Hooks the model and never removes the hook."""

    def compute(self, batch):
        batch.model.hookable_layers()["enc1"].register_forward_hook(lambda *args: None)
        return [MetricValues("leaves-hook", np.zeros(len(batch.image_ids)), "enc5")]


class Infinite(FluencyMetric):
    def compute(self, batch):
        return [MetricValues("infinite", np.full(len(batch.image_ids), np.inf), "enc5")]


class OneShort(FluencyMetric):
    def compute(self, batch):
        return [MetricValues("one-short", np.zeros(len(batch.image_ids) - 1), "enc5")]


class NotAList(FluencyMetric):
    def compute(self, batch):
        return MetricValues("not-a-list", np.zeros(len(batch.image_ids)), "enc5")


class UsesTheModel(FluencyMetric):
    """An activation metric that reads the model when it is there: a store has none."""

    def compute(self, batch):
        bonus = 1.0 if batch.model is not None else 0.0
        return [MetricValues("uses-the-model", batch.activations["enc5"].flatten(1).mean(1) + bonus, "enc5")]


class UndeclaredLayer(FluencyMetric):
    """Declares enc5 but reads enc1."""

    def compute(self, batch):
        return [MetricValues("undeclared", batch.activations["enc1"].flatten(1).mean(1), "enc1")]


class InPlace(FluencyMetric):
    def compute(self, batch):
        a = batch.activations["enc5"]
        return [MetricValues("in-place", a.mul_(2).flatten(1).mean(1), "enc5")]


class MovesWeights(FluencyMetric):
    def compute(self, batch):
        with torch.no_grad():
            next(batch.model.parameters()).add_(1e-3)
        return [MetricValues("moves-weights", np.zeros(len(batch.image_ids)), "enc5")]


class ForgetsImages(FluencyMetric):
    """Sends only some images' values from finish()."""

    def __init__(self, **options):
        super().__init__(**options)
        self.ids: list[str] = []

    def compute(self, batch):
        self.ids += list(batch.image_ids)
        return []

    def finish(self):
        return [(self.ids[:-1], MetricValues("forgets", np.zeros(len(self.ids) - 1), "enc5"))]


@pytest.mark.parametrize("name, factory, fields, message", [
    ("batch-mean", BatchMean, {}, (r"values of 'batch-mean' \(layer 'enc5'\) differ between batch size 7 and batch "
                                   r"size 1: image img\d+ .*whatever the batch size")),
    ("drifting", Drifting, {}, r"differ between a first run and a second run with the same seed"),
    ("leaves-hook", LeavesHook, {}, (r"the live source, batch size 7: hooks changed on the model \(forward hooks "
                                     r"on 'encoder\.\d+'\)")),
    ("infinite", Infinite, {}, r"compute\(\) \(the live source, batch size 7\) gave infinite values of 'infinite'"),
    ("one-short", OneShort, {}, r"gave 6 values of 'one-short' \(layer 'enc5'\) for 7 images"),
    ("not-a-list", NotAList, {}, r"returned MetricValues, expected a list of MetricValues"),
    ("uses-the-model", UsesTheModel, {}, r"differ between the live capture and the activation store"),
    ("undeclared", UndeclaredLayer, {}, r"compute\(\) \(the live source, batch size 7\) raised KeyError: 'enc1'"),
    ("in-place", InPlace, {}, r"modified the activations of 'enc5' in place"),
    ("moves-weights", MovesWeights, {"needs": "model"}, r"changed the model's weights or buffers \['encoder\.0\."),
    ("forgets", ForgetsImages, {}, r"no value of 'forgets' \(layer 'enc5'\) for images \['img013'\]"),
])
def test_a_broken_metric_fails_the_kit_naming_it_and_the_rule(name: str, factory: Any, fields: dict[str, Any],
                                                               message: str) -> None:
    with pytest.raises(AssertionError, match=rf"^metric '{name}': .*{message}"):
        check_metric(metric(name, factory, **fields))


def test_a_metric_requiring_what_the_model_lacks_is_named() -> None:
    spec = metric("inverse-only", BatchMean, needs="model", requires=("inverse",))
    with pytest.raises(AssertionError, match=r"requires \['inverse'\], which the test model VAESmall does not"):
        check_metric(spec)


def analysis(name: str, run: Any) -> AnalysisSpec:
    cls = type("Fake", (Analysis,), {"run": lambda self, data: run(data)})
    return AnalysisSpec(name=name, factory=cls, description="a broken test analysis")


def result(data: Any, **columns: Any) -> pd.DataFrame:
    rows = data.metrics.groupby(["checkpoint", "metric", "layer"]).size().reset_index()
    table = pd.DataFrame({"analysis": columns.pop("analysis", "bad"), "checkpoint": rows["checkpoint"],
                          "metric": rows["metric"], "layer": rows["layer"], "n": 30, "statistic": "r",
                          "estimate": 0.1, "p": 0.5})
    return table.assign(**columns)


def mutated(data: Any) -> Any:
    data.metrics["value"] = 0.0
    return data


@pytest.mark.parametrize("run, message", [
    (lambda d: result(d, p=2.0), r"p values \[2\.0, 2\.0, 2\.0\] are not probabilities in \[0, 1\]"),
    (lambda d: result(d).drop(columns=["n", "statistic"]), r"the result lacks the columns \['n', 'statistic'\]"),
    (lambda d: result(d, analysis="other"), r"rows have analysis \['other'\]; name every row after the analysis"),
    (lambda d: result(d, estimate=np.random.default_rng().normal()), r"two runs on the same data differ"),
    (lambda d: result(mutated(d)), r"run\(\) modified the input's metrics table"),
    (lambda d: result(d).to_dict(), r"run\(\) returned dict, expected a pandas DataFrame"),
    (lambda d: result(d, n=-1), r"n \[-1, -1, -1\] are not counts of images"),
])
def test_a_broken_analysis_fails_the_kit(run: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=rf"^analysis 'bad': {message}"):
        check_analysis(analysis("bad", run))


def test_a_good_fake_analysis_passes_and_returns_its_table() -> None:
    table = check_analysis(analysis("bad", result))
    assert list(table.columns[:8]) == list(RESULT_COLUMNS) and len(table) == 4


def constraint(penalty: Any) -> ConstraintSpec:
    cls = type("Fake", (Constraint,), {"penalty": lambda self, acts, model: penalty(acts)})
    return ConstraintSpec(name="bad", factory=cls, description="a broken test constraint",
                          options={"layers": Option("list[str]", ["enc2"])})


@pytest.mark.parametrize("penalty, message", [
    (lambda a: a["enc2"].detach().abs().mean(), r"does not require grad"),
    (lambda a: a["enc2"].abs().mean(dim=(1, 2, 3)), r"has shape \(4,\), expected a scalar"),
    (lambda a: a["enc2"].abs().mean() + a["enc4"].abs().mean(), r"from its layers \['enc2'\] raised KeyError"),
    (lambda a: a["enc2"].abs().mean() * float("inf"), r"the penalty is inf, expected a finite number"),
    (lambda a: a["enc2"].abs().mean() * 0, r"gradient does not reach the model's weights"),
    (lambda a: a["enc2"].detach().abs().mean().item(), r"the penalty is a float, expected a scalar torch.Tensor"),
])
def test_a_broken_constraint_fails_the_kit(penalty: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=rf"^constraint 'bad': .*{message}"):
        check_constraint(constraint(penalty))


class Ascent(torch.optim.SGD):
    """Gradient ascent: it steps, but uphill."""

    def step(self, closure=None):
        loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=0.01)
        return loss


class IgnoresClosure(torch.optim.SGD):
    def step(self, closure=None):
        return None


@pytest.mark.parametrize("factory, message", [
    (lambda params: Ascent(params, lr=0.01), r"25 steps did not lower the quadratic loss"),
    (lambda params: IgnoresClosure(params, lr=0.01), r"step\(closure\) evaluated the closure 0 times in 25 steps"),
    (lambda params: list(params), r"the factory returned list, expected a torch.optim.Optimizer"),
])
def test_a_broken_optimizer_fails_the_kit(factory: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=rf"^optimizer 'bad': {message}"):
        check_optimizer(OptimizerSpec(name="bad", factory=factory, description="a broken test optimizer"))


def hooks_module(**hooks: Any) -> types.ModuleType:
    module = types.ModuleType("fluency_kit_fake")
    for name, hook in hooks.items():
        setattr(module, name, hookimpl(hook))
    return module


def test_registration_failures_name_the_plugin_and_the_cause() -> None:
    bad_default = hooks_module(fluency_register_metrics=lambda: [MetricSpec(
        name="bad-default", factory=BatchMean, options={"k": Option("int", "three")})])
    with pytest.raises(AssertionError, match=r"plugin 'bad' did not register: .*default of option 'k': expected "
                                             r"int"):
        check_registration(bad_default, "bad")
    clash = hooks_module(fluency_register_metrics=lambda: [MetricSpec(name="gini", factory=BatchMean)])
    with pytest.raises(AssertionError, match=r"plugin 'clash' did not register: metric 'gini': .*registered by both"):
        check_registration(clash, "clash")
    with pytest.raises(AssertionError, match=r"plugin 'empty' registered no spec"):
        check_registration(types.ModuleType("empty"))
    with pytest.raises(AssertionError, match=r"plugin 'raises' did not register: .*RuntimeError: boom"):
        check_registration(hooks_module(fluency_register_analyses=lambda: (_ for _ in ()).throw(RuntimeError("boom"))),
                           "raises")


def test_an_option_that_accepts_a_wrong_type_or_a_factory_that_does_not_load_fails() -> None:
    class Lenient(MetricSpec):
        def resolve(self, *layers):
            return {k: v for layer in layers for k, v in layer.items()}

    spec = Lenient(name="lenient", factory=BatchMean, options={"k": Option("int", 3)})
    with pytest.raises(AssertionError, match=r"^metric 'lenient': option 'k' \(int\) given 'not-an-int' was accepted"):
        check_options(spec)
    missing = MetricSpec(name="missing", factory="fluency_no_such_module:Metric")
    with pytest.raises(AssertionError, match=r"^metric 'missing': loading its factory raised ModuleNotFoundError"):
        check_options(missing)


# -- architectures of every kind ---------------------------------------------------------------------


class AffineFlow(FluencyFlow):
    """z = (x − ½)·e^s + t per channel, exactly invertible."""

    default_metric_layers = ("z",)

    def __init__(self, image_size: int = 16) -> None:
        super().__init__(image_size=image_size)
        self.s, self.t, self.tap = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3)), nn.Identity()

    def hookable_layers(self):
        return {"z": self.tap}

    def forward(self, x, sample=True):
        z = self.tap((x - 0.5) * self.s.exp().view(1, 3, 1, 1) + self.t.view(1, 3, 1, 1))
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return FlowOutput(z, log_pz + x.shape[2] * x.shape[3] * self.s.sum(), x[0].numel())

    def inverse(self, z):
        return (z - self.t.view(1, 3, 1, 1)) * (-self.s).exp().view(1, 3, 1, 1) + 0.5


class ConvEncoder(FluencyEncoder):
    default_metric_layers = ("conv",)

    def __init__(self, image_size: int = 16) -> None:
        super().__init__(image_size=image_size)
        self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

    def hookable_layers(self):
        return {"conv": self.conv, "relu": self.relu}

    def forward(self, x, sample=True):
        return EncoderOutput(self.relu(self.conv(x)))


SIZE = {"image_size": Option("int", 16, "side", minimum=4)}


@pytest.mark.parametrize("factory", [AffineFlow, ConvEncoder])
def test_flows_and_encoders_pass_the_architecture_check(factory: Any) -> None:
    model = check_architecture(ArchitectureSpec(name="kind", factory=factory, options=SIZE))
    assert model.kind in ("flow", "encoder")


class Noisy(ConvEncoder):
    def forward(self, x, sample=True):
        return EncoderOutput(self.relu(self.conv(x + 0.01 * torch.randn_like(x))))


class HooksItself(ConvEncoder):
    def forward(self, x, sample=True):
        self.conv.register_forward_pre_hook(lambda *args: None)
        return super().forward(x)


class WrongDefaults(ConvEncoder):
    default_metric_layers = ("conv", "pool")


class Silent(ConvEncoder):
    def forward(self, x, sample=True):
        return EncoderOutput(self.conv(x))  # relu is listed as hookable but never runs


class BadObjective(AffineFlow):
    def objective(self, output, images, settings):
        return {"loss": output.log_likelihood.sum()}


class LossyInverse(AffineFlow):
    def inverse(self, z):
        return super().inverse(z) + 0.01


class NotAFluencyModel(nn.Module):
    def __init__(self, image_size: int = 16) -> None:
        super().__init__()


@pytest.mark.parametrize("factory, message", [
    (Noisy, r"two forward passes with sample=False differ in output.features"),
    (HooksItself, r"hooks changed on the model after capturing its layers \(forward pre hooks on 'conv'\)"),
    (WrongDefaults, r"default_metric_layers \['pool'\] are not hookable layers"),
    (Silent, r"hookable layers \['relu'\] gave no tensor"),
    (BadObjective, r"objective\(\) terms \['loss \(\)'\] are not one value per image \(shape \(2,\)\)"),
    (LossyInverse, r"provides 'inverse' but inverse\(latent\(model\(images\)\)\) does not give the images back"),
    (NotAFluencyModel, r"the factory returned NotAFluencyModel, expected a FluencyModel"),
])
def test_a_broken_architecture_fails_the_kit(factory: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=rf"^architecture 'bad': {message}"):
        check_architecture(ArchitectureSpec(name="bad", factory=factory, options=SIZE))


def test_the_kit_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    check_metric(MetricSpec(name="mean-activation", factory=MeanActivation,
                            options={"layers": Option("list[str]", ["enc5"]), "scale": Option("float", 1.0)}))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_synthetic_inputs_are_deterministic_and_in_range() -> None:
    ids, a = synthetic_images(5)
    _, b = synthetic_images(5)
    assert ids == ["img000", "img001", "img002", "img003", "img004"] and torch.equal(a, b)
    assert a.shape == (5, 3, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    model = tiny_model()
    assert not model.training and model.input_shape == (3, 32, 32) and "att3" in model.hookable_layers()
