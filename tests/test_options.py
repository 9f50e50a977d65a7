"""Typed plugin options: validation, -o parsing, config files and the layering of defaults."""

from __future__ import annotations

import pytest

from fluency.core.plugin.config import resolve_plugin_options
from fluency.core.errors import OptionError
from fluency.core.plugin.options import Option, parse_assignment, parse_value


def test_parse_value_reads_toml_literals_and_falls_back_to_strings() -> None:
    assert parse_value("0.1") == 0.1
    assert parse_value("3") == 3
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("encoder") == "encoder"


def test_option_validation_converts_and_rejects() -> None:
    assert Option("float", 1.0).validate(2, "x") == 2.0
    assert Option("list[str]").validate("enc1", "x") == ["enc1"]
    with pytest.raises(OptionError, match="expected float"):
        Option("float").validate("abc", "metric 'sam'.rho")
    with pytest.raises(OptionError, match="expected int"):
        Option("int").validate(True, "x")
    with pytest.raises(OptionError, match="not one of"):
        Option("str", choices=("a", "b")).validate("c", "x")
    with pytest.raises(OptionError, match="below the minimum"):
        Option("float", minimum=0.0).validate(-1.0, "x")


def test_parse_assignment_forms() -> None:
    a = parse_assignment("sam.rho=0.1", ("metric", "optimizer"))
    assert (a.kind, a.plugin, a.key, a.value) == (None, "sam", "rho", 0.1)
    a = parse_assignment("optimizer.sam.rho=0.5", ("metric", "optimizer"))
    assert (a.kind, a.plugin, a.key, a.value) == ("optimizer", "sam", "rho", 0.5)
    for bad in ("sam", "sam.rho", "=1", "a.b.c.d=1"):
        with pytest.raises(OptionError):
            parse_assignment(bad, ("metric",))
    with pytest.raises(OptionError, match="unknown plugin kind"):
        parse_assignment("metrc.sam.rho=1", ("metric",))


def test_layers_default_registry_config_cli(manager) -> None:
    used = [("metric", "sam")]
    assert resolve_plugin_options(manager, used)[("metric", "sam")]["rho"] == 0.05  # registry.toml
    config = {"sam": {"rho": 0.2, "adaptive": True}}
    opts = resolve_plugin_options(manager, used, config=config)[("metric", "sam")]
    assert (opts["rho"], opts["adaptive"]) == (0.2, True)
    opts = resolve_plugin_options(manager, used, ["sam.rho=0.3"], config)[("metric", "sam")]
    assert (opts["rho"], opts["adaptive"]) == (0.3, True)
    opts = resolve_plugin_options(manager, used, config={"metric": {"sam": {"rho": 0.4}}})[("metric", "sam")]
    assert opts["rho"] == 0.4


def test_unknown_and_mistyped_options_are_errors(manager) -> None:
    used = [("metric", "sam")]
    with pytest.raises(OptionError, match="unknown option 'rh'.*did you mean 'rho'"):
        resolve_plugin_options(manager, used, ["sam.rh=0.1"])
    with pytest.raises(OptionError, match="expected float"):
        resolve_plugin_options(manager, used, ["sam.rho=abc"])
    with pytest.raises(OptionError, match="not used by this command"):
        resolve_plugin_options(manager, used, ["gini.layers=enc1"])
    with pytest.raises(OptionError, match="names no known plugin"):
        resolve_plugin_options(manager, used, config={"nosuch": {"a": 1}})


def test_same_name_in_two_kinds_needs_the_kind() -> None:
    """A command using the metric `sam` and an optimizer `sam` must disambiguate with KIND.NAME."""
    from fluency import MetricSpec, OptimizerSpec, hookimpl
    from fluency.core.plugin.manager import PluginManager

    class TwoSams:
        @hookimpl
        def fluency_register_optimizers(self):
            return [OptimizerSpec(name="sam2", factory=dict, options={"rho": Option("float", 0.05)})]

        @hookimpl
        def fluency_register_metrics(self):
            return [MetricSpec(name="sam2", factory=dict, options={"rho": Option("float", 0.05)})]

    pm = PluginManager(autoload=False)
    pm.register(TwoSams(), "two-sams")
    used = [("metric", "sam2"), ("optimizer", "sam2")]
    with pytest.raises(OptionError, match="ambiguous"):
        resolve_plugin_options(pm, used, ["sam2.rho=0.1"])
    out = resolve_plugin_options(pm, used, ["optimizer.sam2.rho=0.1"])
    assert out[("optimizer", "sam2")]["rho"] == 0.1 and out[("metric", "sam2")]["rho"] == 0.05


def test_schema_shows_the_default_a_run_uses(monkeypatch) -> None:
    """registry.toml overrides a plugin's declared default: `fluency schema` shows that value, and the declared one."""
    import copy
    import json

    from click.testing import CliRunner

    from fluency.cli import cli
    from fluency.core.plugin import manager as plugins
    from fluency.core.plugin.manager import PluginManager

    registry = copy.deepcopy(plugins.read_registry())
    registry["defaults"]["metric"]["sam"] = {"rho": 0.1}
    registry["defaults"]["metric"]["lepsilon"] = {"epsilon": 1}  # an int for a float option
    monkeypatch.setattr(plugins, "read_registry", lambda: registry)
    monkeypatch.setenv("FLUENCY_DISABLE_PLUGIN_AUTOLOAD", "1")
    res = CliRunner().invoke(cli, ["schema", "metric.sam"])
    assert res.exit_code == 0, res.output
    rho = json.loads(res.stdout)["metric.sam"]["rho"]
    assert (rho["default"], rho["declared_default"]) == (0.1, 0.05)
    assert "declared_default" not in json.loads(res.stdout)["metric.sam"]["adaptive"]
    used = [("metric", "sam"), ("metric", "lepsilon")]
    resolved = resolve_plugin_options(PluginManager(autoload=False), used)
    assert resolved[("metric", "sam")]["rho"] == rho["default"]
    epsilon = json.loads(CliRunner().invoke(cli, ["schema", "lepsilon"]).stdout)["metric.lepsilon"]["epsilon"]
    assert epsilon["default"] == 1.0 == resolved[("metric", "lepsilon")]["epsilon"] and "declared_default" in epsilon
    listing = json.loads(CliRunner().invoke(cli, ["plugins", "sam", "--kind", "metric", "--json"]).stdout)
    assert listing[0]["options"]["rho"]["default"] == 0.1


def test_list_options_from_the_command_line_accept_commas_and_unquoted_brackets() -> None:
    """``-o partial.covariates=[luminance,rms-contrast]`` is not TOML (unquoted strings) and reaches the option
    as one string; it must become the list the user meant, not a one-item list of the whole text."""
    from fluency.core.plugin.options import Option, OptionError

    names = Option("list[str]")
    assert names.validate("[luminance,rms-contrast]", "x") == ["luminance", "rms-contrast"]
    assert names.validate("enc1, enc2", "x") == ["enc1", "enc2"]
    assert names.validate("enc1", "x") == ["enc1"] and names.validate(["a b"], "x") == ["a b"]
    weights = Option("list[float]")
    assert weights.validate("[1,2,0.5]", "x") == [1.0, 2.0, 0.5] and weights.validate(3, "x") == [3.0]
    with pytest.raises(OptionError, match=r"x\[1\]: expected float, got str 'a'"):
        weights.validate("[1,a]", "x")
