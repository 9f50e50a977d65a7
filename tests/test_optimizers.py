"""Optimizer plugins (adamw, sgd, sam) and LR schedules.

SAM's steps are checked against their formulas on a quadratic with known gradients and
against plain torch optimizers fed the gradient at the perturbed point; BatchNorm
statistics, resume (state dict) and schedulers on the SAM optimizer are checked too.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from fluency.core.errors import FluencyError, OptionError, PluginError
from fluency.core.train.schedules import SCHEDULES, build_scheduler
from fluency.plugins.default_sam_optimizer import SAM, build_sam

A = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
W0 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)


def quadratic(base: str = "sgd", **options):
    """w = W0, L(w) = ½ Σ a_i w_i² (gradient a ⊙ w), and a SAM optimizer on w."""
    w = nn.Parameter(W0.clone())
    opt = build_sam([w], base=base, model=nn.Module(), **options)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (A * w * w).sum()
        loss.backward()
        return loss

    return w, opt, closure


def grad_at(point: torch.Tensor) -> torch.Tensor:
    """Gradient of the quadratic at ``point`` by autograd, independent of SAM."""
    x = point.clone().requires_grad_(True)
    (0.5 * (A * x * x).sum()).backward()
    return x.grad


# -- SAM: the formulas ------------------------------------------------------

def test_first_step_adds_rho_g_over_norm() -> None:
    w, opt, closure = quadratic(rho=0.05, lr=0.1)
    closure()
    opt.first_step()
    g = A * W0
    assert torch.allclose(w.detach() - W0, 0.05 * g / g.norm(), rtol=0, atol=1e-12)
    assert (w.detach() - W0).norm().item() == pytest.approx(0.05, rel=1e-12)  # |ε̂| = ρ
    opt.second_step()  # restores W0 before stepping: SGD with lr 0.1 from W0 with the stored gradient
    assert torch.allclose(w.detach(), W0 - 0.1 * g, rtol=0, atol=1e-12)


def test_one_norm_over_all_parameters() -> None:
    """Two parameters share one norm (per-parameter norms would give |ε̂_i| = ρ each)."""
    a, b = nn.Parameter(torch.tensor([3.0])), nn.Parameter(torch.tensor([4.0]))
    opt = SAM(torch.optim.SGD([a, b], lr=0.1), rho=1.0, model=nn.Module())
    (a * a * 0.5 + b * b * 0.5).sum().backward()  # g = (3, 4), |g| = 5
    opt.first_step()
    assert a.item() == pytest.approx(3.0 + 3 / 5) and b.item() == pytest.approx(4.0 + 4 / 5)


def test_asam_perturbation_matches_its_formula() -> None:
    w, opt, closure = quadratic(rho=0.5, adaptive=True)
    closure()
    opt.first_step()
    g = A * W0
    expected = 0.5 * W0**2 * g / (W0.abs() * g).norm()
    assert torch.allclose(w.detach() - W0, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(expected, 0.5 * g / g.norm())  # really a different perturbation


@pytest.mark.parametrize("adaptive", [False, True])
def test_step_is_sgd_with_the_gradient_at_the_perturbed_point(adaptive: bool) -> None:
    rho = 0.5 if adaptive else 0.05
    w, opt, closure = quadratic(rho=rho, adaptive=adaptive, lr=0.1, momentum=0.0)
    g = A * W0
    eps = rho * W0**2 * g / (W0.abs() * g).norm() if adaptive else rho * g / g.norm()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(0.5 * float((A * W0 * W0).sum()))  # the unperturbed loss
    assert torch.allclose(w.detach(), W0 - 0.1 * A * (W0 + eps), rtol=0, atol=1e-12)


def test_steps_equal_plain_adam_fed_the_perturbed_gradient() -> None:
    """Five SAM(adam) steps against torch.optim.Adam stepping with ∇L(w + ρ g/|g|) computed by hand."""
    w, opt, closure = quadratic(base="adam", rho=0.05, lr=0.01)
    v = nn.Parameter(W0.clone())
    plain = torch.optim.Adam([v], lr=0.01)
    for _ in range(5):
        opt.step(closure)
        g = grad_at(v.detach())
        perturbed = v.detach() + 0.05 * g / (g.norm() + 1e-12)
        v.grad = grad_at(perturbed)
        plain.step()
    assert torch.allclose(w.detach(), v.detach(), rtol=0, atol=1e-14)
    assert not torch.allclose(w.detach(), W0)


def test_closure_that_does_not_zero_gradients_still_steps_with_the_perturbed_gradient() -> None:
    w, opt, _ = quadratic(rho=0.05, lr=0.1, momentum=0.0)

    def closure() -> torch.Tensor:  # accumulates into .grad
        loss = 0.5 * (A * w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    g = A * W0
    assert torch.allclose(w.detach(), W0 - 0.1 * A * (W0 + 0.05 * g / g.norm()), rtol=0, atol=1e-12)


def test_step_without_closure_is_an_error() -> None:
    _, opt, _ = quadratic()
    with pytest.raises(FluencyError, match="closure"):
        opt.step()


def test_parameters_without_gradient_are_left_alone() -> None:
    used, unused = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([5.0]))
    opt = build_sam([used, unused], base="sgd", lr=0.1, model=nn.Module())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert unused.item() == 5.0 and not torch.equal(used.detach(), torch.tensor([1.0, 2.0]))


# -- SAM: BatchNorm, schedulers, resume --------------------------------------

def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def bn_closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss
    return closure


def test_batchnorm_statistics_updated_once_per_step_with_model() -> None:
    model = bn_model()
    reference = copy.deepcopy(model)
    opt = build_sam(model.parameters(), base="sgd", lr=0.1, rho=0.5, model=model)
    x = torch.randn(16, 4) * 3 + 1
    with torch.no_grad():
        reference(x)  # one training-mode pass at the same weights
    momenta: list[float] = []
    model[1].register_forward_pre_hook(lambda m, _: momenta.append(m.momentum))
    opt.step(bn_closure(model, opt, x))
    assert momenta == [0.1, 0.0]  # frozen on the second (perturbed) pass only
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    assert bn.momentum == 0.1  # restored after the second pass
    for _ in range(2):
        opt.step(bn_closure(model, opt, x))
    assert int(bn.num_batches_tracked) == 3


def test_without_model_warns_and_batchnorm_counts_twice() -> None:
    model = bn_model()
    with pytest.warns(UserWarning, match="BatchNorm"):
        opt = build_sam(model.parameters(), base="sgd", lr=0.1)
    opt.step(bn_closure(model, opt, torch.randn(16, 4)))
    assert int(model[1].num_batches_tracked) == 2  # the documented cost of not passing model


def test_param_groups_are_shared_so_schedulers_drive_the_base() -> None:
    model = nn.Linear(3, 1)
    opt = build_sam(model.parameters(), base="sgd", lr=0.1, model=model)
    assert opt.param_groups is opt.base.param_groups
    sched = build_scheduler(opt, "step", epochs=2, steps_per_epoch=1, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before optimizer" warning
        opt.step(bn_closure(model, opt, torch.randn(4, 3)))
        sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_state_dict_round_trip_gives_identical_steps() -> None:
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.randn(8, 1)

    def make():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        return model, build_sam(model.parameters(), rho=0.05, base="adam", lr=0.01, model=model)

    def closure_for(model, opt):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss
        return closure

    a, opt_a = make()
    for _ in range(3):
        opt_a.step(closure_for(a, opt_a))
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    saved = copy.deepcopy(opt_a.state_dict())  # as a checkpoint file would hold it
    assert saved["param_groups"][0]["rho"] == 0.05 and saved["state"]  # Adam moments are in it
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups is opt_b.base.param_groups
    for _ in range(2):
        opt_a.step(closure_for(a, opt_a))
        opt_b.step(closure_for(b, opt_b))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# -- registration and options ------------------------------------------------

def test_optimizers_registered_and_built_with_registry_defaults(manager) -> None:
    model = nn.Linear(2, 2)
    built = {}
    for name in ("adam", "adamw", "sgd", "sam"):
        spec = manager.get("optimizer", name)
        options = spec.resolve(manager.option_defaults("optimizer", name))
        built[name] = spec.load()(model.parameters(), **options, **({"model": model} if name == "sam" else {}))
    assert isinstance(built["adamw"], torch.optim.AdamW) and built["adamw"].defaults["weight_decay"] == 0.01
    assert isinstance(built["sgd"], torch.optim.SGD)
    assert isinstance(built["sam"], SAM) and isinstance(built["sam"].base, torch.optim.Adam)
    assert manager.option_defaults("optimizer", "sam") == {"rho": 0.05}
    assert built["sam"].param_groups[0]["rho"] == 0.05
    assert manager.get("metric", "sam").name == "sam"  # same name, other kind: intended


def test_sam_passes_lr_weight_decay_momentum_to_the_base() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    sgd = build_sam(p, base="sgd", lr=0.2, momentum=0.5, weight_decay=1e-4, model=nn.Module()).base
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.2, 0.5, 1e-4)
    with pytest.warns(UserWarning, match="momentum"):
        adam = build_sam(p, base="adam", lr=0.3, momentum=0.5, model=nn.Module()).base
    assert adam.defaults["lr"] == 0.3


def test_sam_refuses_itself_and_unknown_bases() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(OptionError, match="cannot be sam"):
        build_sam(p, base="sam", model=nn.Module())
    with pytest.raises(PluginError, match="unknown optimizer"):
        build_sam(p, base="nope", model=nn.Module())


def test_sgd_nesterov_without_momentum_is_an_option_error(manager) -> None:
    spec = manager.get("optimizer", "sgd")
    with pytest.raises(OptionError, match="nesterov"):
        spec.load()([nn.Parameter(torch.zeros(1))], **spec.resolve({"nesterov": True, "momentum": 0.0}))


# -- schedules ---------------------------------------------------------------

def lrs(name: str, steps: int, **kwargs) -> list[float]:
    """Learning rates used by steps 1..steps, then the rate after the last step."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, name, **kwargs)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def test_cosine_decays_to_zero_at_the_end() -> None:
    seen = lrs("cosine", 10, epochs=2, steps_per_epoch=5)
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(0.0, abs=1e-12)
    assert seen[5] == pytest.approx(0.5) and seen == sorted(seen, reverse=True)


def test_warmup_rises_linearly_then_cosine_to_zero() -> None:
    seen = lrs("linear-warmup-cosine", 12, epochs=3, steps_per_epoch=4, warmup_epochs=1)
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[4] == pytest.approx(1.0) and seen[8] == pytest.approx(0.5)
    assert seen[-1] == pytest.approx(0.0, abs=1e-12) and seen[4:] == sorted(seen[4:], reverse=True)


def test_step_schedule_and_none() -> None:
    seen = lrs("step", 6, epochs=3, steps_per_epoch=2, step_size=1, gamma=0.5)
    assert seen == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler(opt, "none", epochs=1, steps_per_epoch=1) is None
    assert SCHEDULES == ("none", "cosine", "step", "linear-warmup-cosine")


def test_unknown_schedule_is_a_clear_error() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(OptionError, match=r"unknown schedule 'exponential'; use one of none, cosine"):
        build_scheduler(opt, "exponential", epochs=1, steps_per_epoch=1)
