"""The registration: the spec, its options, a cheap import, and fluency's contract checks for architectures."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fluency.api import FluencyError, FluencyFlow
from fluency.testing import check_plugin, check_registration

from fluency_flows import plugin


def spec():
    return plugin.fluency_register_architectures()[0]


def test_the_spec_builds_glow_small_with_its_defaults() -> None:
    s = spec()
    assert s.name == "glow-small" and s.factory == "fluency_flows.model:GlowSmall" and plugin.FLUENCY_PLUGIN_API == "1.1"
    options = s.resolve({})
    assert options == {"image_size": 32, "levels": 2, "steps": 4, "hidden_channels": 64}
    model = s.load()(**options)
    assert isinstance(model, FluencyFlow) and model.kind == "flow" and model.options == options
    assert {"latent", "objective", "inverse"} <= model.provides and "decoder" not in model.provides


def test_an_image_size_that_levels_cannot_halve_is_refused_in_one_line() -> None:
    s = spec()
    with pytest.raises(FluencyError, match="glow-small: image_size must be a multiple of 8, got 12"):
        s.load()(**s.resolve({"image_size": 12, "levels": 3}))
    with pytest.raises(FluencyError):
        s.resolve({"steps": 0})


def test_registration_does_not_import_normflows() -> None:
    code = ("import sys, fluency_flows.plugin as p; p.fluency_register_architectures(); "
            "print('normflows' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fluencys_contract_for_architectures() -> None:
    (registered,) = check_registration(plugin)
    torch.manual_seed(0)
    model = check_plugin(registered, {"image_size": 16, "steps": 2, "hidden_channels": 16})
    assert model.default_metric_layers == ("scale1", "scale2")
