"""Plugin discovery with real third-party packages installed by pip into a throw-away folder.

Packages: one good (a working metric), three broken (import error, exception in a
hook, a hook signature pluggy rejects) and one that registers the metric name
``gini`` again (a clash with the built-in).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from fluency import MetricSpec, hookimpl
from fluency.core.errors import PluginError
from fluency.core.plugin.manager import PluginManager
from fluency.core.plugin.specs import KINDS

PACKAGES = {
    "fluency-good": ("1.2.3", "fluency_good", """
        from fluency import FluencyMetric, MetricSpec, MetricValues, Option, hookimpl

        class MeanActivation(FluencyMetric):
            def compute(self, batch):
                return [MetricValues("mean-activation", batch.activations[layer].flatten(1).mean(1)
                                     * self.options["scale"], layer) for layer in self.batch_layers(batch)]

        @hookimpl
        def fluency_register_metrics():
            return [MetricSpec(name="mean-activation", factory="fluency_good:MeanActivation",
                               description="Mean activation per layer (a test plugin).",
                               options={"layers": Option("list[str]"), "scale": Option("float", 1.0)})]
    """),
    "fluency-broken-import": ("0.3", "fluency_broken_import", """
        import a_module_that_does_not_exist  # noqa
    """),
    "fluency-broken-hook": ("0.4", "fluency_broken_hook", """
        from fluency import hookimpl

        @hookimpl
        def fluency_register_metrics():
            raise RuntimeError("registration exploded")
    """),
    "fluency-bad-signature": ("0.5", "fluency_bad_signature", """
        from fluency import hookimpl

        @hookimpl
        def fluency_register_metrics(config):
            return []
    """),
    "fluency-clash": ("0.1", "fluency_clash", """
        from fluency import MetricSpec, hookimpl

        @hookimpl
        def fluency_register_metrics():
            return [MetricSpec(name="gini", factory="fluency_clash:nothing", description="Another gini.")]
    """),
}
EP_NAMES = {"fluency-good": "good", "fluency-broken-import": "broken-import", "fluency-broken-hook": "broken-hook",
            "fluency-bad-signature": "bad-signature", "fluency-clash": "clash"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the five packages into a folder used as PYTHONPATH by the subprocesses."""
    src = tmp_path_factory.mktemp("src")
    target = tmp_path_factory.mktemp("site")
    dirs = []
    for dist, (version, module, code) in PACKAGES.items():
        pkg = src / dist
        pkg.mkdir()
        (pkg / f"{module}.py").write_text(textwrap.dedent(code))
        (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "{dist}"
            version = "{version}"
            [project.entry-points.fluency]
            {EP_NAMES[dist]} = "{module}"
            [tool.setuptools]
            py-modules = ["{module}"]
        """))
        dirs.append(str(pkg))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), *dirs], check=True)
    return target


def fluency(site: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200", **(env or {})}
    for var in ("FLUENCY_DISABLE_PLUGIN_AUTOLOAD", "FLUENCY_BLOCK_PLUGINS", "FLUENCY_STRICT_PLUGINS"):
        if var not in (env or {}):
            environ.pop(var, None)
    return subprocess.run([sys.executable, "-m", "fluency.cli", *args], capture_output=True, text=True, env=environ,
                          timeout=300)


def rows(site: Path, env: dict[str, str] | None = None) -> list[dict]:
    proc = fluency(site, "plugins", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def find(listing: list[dict], **match: str) -> list[dict]:
    return [r for r in listing if all(r[k] == v for k, v in match.items())]


def test_good_plugin_is_listed_with_package_and_version(site: Path) -> None:
    (row,) = find(rows(site), name="mean-activation")
    assert (row["kind"], row["package"], row["version"], row["status"]) == ("metric", "fluency-good", "1.2.3", "ok")
    assert row["options"]["scale"]["type"] == "float"


def test_broken_plugins_are_recorded_and_the_cli_still_works(site: Path) -> None:
    listing = rows(site)
    for ep, package, fragment in [("broken-import", "fluency-broken-import", "a_module_that_does_not_exist"),
                                  ("broken-hook", "fluency-broken-hook", "registration exploded"),
                                  ("bad-signature", "fluency-bad-signature", "config")]:
        (row,) = find(listing, name=ep)
        assert row["status"] == "broken" and row["package"] == package and fragment in row["error"], row
    assert find(listing, name="sam", kind="metric")[0]["status"] == "ok"
    table = fluency(site, "plugins")
    assert table.returncode == 0 and "broken" in table.stdout


def test_asking_for_a_broken_plugin_is_one_line_naming_package_version_error(site: Path) -> None:
    proc = fluency(site, "run", "--metric", "broken-import", "--no-store")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "fluency-broken-import 0.3" in lines[0] and "a_module_that_does_not_exist" in lines[0]


def test_clashing_names_are_an_error_naming_both_packages(site: Path) -> None:
    clash = find(rows(site), name="gini", kind="metric")
    assert len(clash) == 2 and all(r["status"] == "broken" for r in clash)
    assert "fluency 0.1.0" in clash[0]["error"] and "fluency-clash 0.1" in clash[0]["error"]
    proc = fluency(site, "run", "--metric", "gini", "--no-store")
    assert proc.returncode == 2 and "registered by both" in proc.stderr


def test_blocking_and_disabling_autoload(site: Path) -> None:
    listing = rows(site, {"FLUENCY_BLOCK_PLUGINS": " Fluency_Clash ,  no-such-package"})  # normalised names
    assert find(listing, name="clash")[0]["status"] == "blocked"
    assert find(listing, name="gini", kind="metric")[0]["status"] == "ok"
    listing = rows(site, {"FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert {r["package"] for r in listing} == {"fluency"}


def test_strict_mode_fails_on_a_broken_plugin(site: Path) -> None:
    proc = fluency(site, "plugins", env={"FLUENCY_STRICT_PLUGINS": "1"})
    assert proc.returncode == 2 and "failed to load" in proc.stderr


def test_third_party_metric_runs_end_to_end(site: Path, tmp_path: Path) -> None:
    proc = fluency(site, "run", "--metric", "mean-activation", "-o", "mean-activation.scale=2", "--layers", "enc1",
                   "--out", str(tmp_path / "run"), "--json")
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    table = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    table = table[table["plugin"] == "mean-activation"]  # beside it: the image-stats covariates of every run
    assert set(table["metric"]) == {"mean-activation"} and set(table["layer"]) == {"enc1"}
    assert (table["value"] >= 0).all() and len(table) == 240


def test_in_process_registration_and_lookup_errors() -> None:
    class Plugin:
        @hookimpl
        def fluency_register_metrics(self):
            return [MetricSpec(name="answer", factory=dict, description="Forty-two.\nMore text.")]

    pm = PluginManager(autoload=False)
    pm.register(Plugin(), "answer-plugin", "answer-pkg", "4.2")
    assert pm.get("metric", "answer").summary == "Forty-two."
    assert "answer" in pm.names("metric") and "answer" not in pm.names("analysis")
    with pytest.raises(PluginError, match=r"unknown metric 'nope' \(available: .*gini"):
        pm.get("metric", "nope")
    assert [r.name for r in pm.list("gi*", "metric")] == ["gini"]


def test_malformed_specs_and_unknown_hooks_mark_the_plugin_broken() -> None:
    class BadName:
        @hookimpl
        def fluency_register_metrics(self):
            return [MetricSpec(name="Bad Name", factory=dict)]

    class WrongType:
        @hookimpl
        def fluency_register_metrics(self):
            return ["not a spec"]

    class Typo:
        def fluency_register_metric(self):  # missing 's'
            return []

    pm = PluginManager(autoload=False)
    for i, plugin in enumerate((BadName(), WrongType(), Typo())):
        pm.register(plugin, f"bad{i}", f"pkg{i}", "1")
    errors = {r.name: r.error for r in pm.list() if r.status == "broken"}
    assert "invalid metric name" in errors["bad0"]
    assert "expected MetricSpec" in errors["bad1"]
    assert "unknown hook" in errors["bad2"]


def test_every_builtin_kind_has_a_plugin_and_every_builtin_option_default_validates(manager) -> None:
    kinds_with_plugins = {r.kind for r in manager.list() if r.status == "ok"}
    assert {"architecture", "optimizer", "metric", "analysis"} <= kinds_with_plugins
    assert all(r.status == "ok" for r in manager.list()), [r for r in manager.list() if r.status != "ok"]
    for record in manager.list():
        assert record.kind in KINDS
        record.spec.resolve(manager.option_defaults(record.kind, record.name))


def metric_plugin(name: str) -> object:
    """An in-process plugin object registering one metric ``name``."""
    class Plugin:
        @hookimpl
        def fluency_register_metrics(self):
            return [MetricSpec(name=name, factory=dict, description=f"{name} (a test plugin).")]

    return Plugin()


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *eps: tuple[str, str, str, object]) -> None:
    """Make the entry-point group ``fluency`` hold exactly ``(name, distribution, version, plugin)`` entries."""
    from fluency.core.plugin import manager as plugins

    fakes = [SimpleNamespace(name=name, value=f"{dist}:plugin", group="fluency", load=lambda p=plugin: p,
                             dist=SimpleNamespace(metadata={"Name": dist}, version=version))
             for name, dist, version, plugin in eps]
    monkeypatch.setattr(plugins.md, "entry_points", lambda group: [e for e in fakes if e.group == group])


def test_one_entry_point_name_in_two_distributions_keeps_the_first_and_names_both(monkeypatch) -> None:
    fake_entry_points(monkeypatch, ("dup", "fluency-one", "1.0", metric_plugin("one-metric")),
                      ("dup", "fluency-two", "2.0", metric_plugin("two-metric")))
    pm = PluginManager()
    assert pm.get("metric", "one-metric").name == "one-metric" and "two-metric" not in pm.names("metric")
    (broken,) = [r for r in pm.list() if r.status == "broken"]
    assert (broken.name, broken.package, broken.version) == ("dup", "fluency-two", "2.0")
    assert "fluency-one 1.0 and fluency-two 2.0" in broken.error and "already registered" not in broken.error
    assert "FLUENCY_BLOCK_PLUGINS" in broken.error
    with pytest.raises(PluginError, match=r"fluency-two 2\.0 failed to load: .*'dup' .*fluency-one 1\.0"):
        PluginManager(strict=True)
    monkeypatch.setenv("FLUENCY_BLOCK_PLUGINS", "fluency-one")  # blocking the first lets the second in
    assert "two-metric" in PluginManager().names("metric")


def test_blocked_names_are_normalised_and_match_distributions_and_entry_points(monkeypatch) -> None:
    fake_entry_points(monkeypatch, ("good-one", "Fluency_Good.Pkg", "1.0", metric_plugin("m-one")),
                      ("good_two", "fluency-other", "1.0", metric_plugin("m-two")),
                      ("kept", "fluency-kept", "1.0", metric_plugin("m-kept")))
    monkeypatch.setenv("FLUENCY_BLOCK_PLUGINS", " fluency-good-pkg ,GOOD-TWO,, ")
    pm = PluginManager()
    status = {r.name: r.status for r in pm.list()}
    assert status["good-one"] == status["good_two"] == "blocked" and status["m-kept"] == "ok"
    assert not {"m-one", "m-two"} & set(pm.names("metric"))
    blocked = PluginManager(blocked=["FLUENCY.GOOD_PKG", "Kept"])
    assert {r.name for r in blocked.list() if r.status == "blocked"} == {"good-one", "kept"}


@pytest.mark.parametrize("declared, ok", [(None, True), ("1", True), ("1.0", True), ("2", False), ("1.9", False),
                                          ("one", False)])
def test_a_plugin_for_another_api_version_is_listed_incompatible(declared: str | None, ok: bool) -> None:
    import types

    from fluency.api import PLUGIN_API_VERSION, MetricSpec, hookimpl
    from fluency.plugins.default_hoyer import Hoyer

    module = types.ModuleType("fluency_future")
    if declared is not None:
        module.FLUENCY_PLUGIN_API = declared

    @hookimpl
    def fluency_register_metrics():
        return [MetricSpec(name="future-metric", factory=Hoyer)]

    module.fluency_register_metrics = fluency_register_metrics
    pm = PluginManager(autoload=False)
    pm.register(module, "fluency_future", package="fluency-future", version="3.0")
    (record,) = [r for r in pm.records if r.package == "fluency-future"]
    assert (record.status == "ok") is ok
    if not ok:
        assert record.error.startswith("PluginError: incompatible") and record.kind is None
        if declared != "one":
            assert f"built for fluency plugin API {declared}, this fluency provides {PLUGIN_API_VERSION}" in record.error
        with pytest.raises(PluginError, match="fluency-future 3.0"):
            pm.get("metric", "future-metric")


def _module(name: str, **hooks):
    import types

    module = types.ModuleType(name)
    for hook_name, hook in hooks.items():
        setattr(module, hook_name, hookimpl(hook))
    return module


def test_an_option_default_that_fails_its_own_declaration_breaks_the_plugin() -> None:
    from fluency.api import Option
    from fluency.plugins.default_hoyer import Hoyer

    module = _module("fluency_baddefault", fluency_register_metrics=lambda: [MetricSpec(
        name="bad-default", factory=Hoyer, options={"k": Option("int", "abc"), "c": Option("str", "x", choices=("y",))})])
    pm = PluginManager(autoload=False)
    pm.register(module, "fluency_baddefault", package="fluency-baddefault", version="0.1")
    (record,) = [r for r in pm.records if r.package == "fluency-baddefault"]
    assert record.status == "broken" and "the default of option 'k': expected int" in record.error


def test_contract_violations_and_column_clashes_are_one_line_naming_the_plugin(tmp_path: Path) -> None:
    import fluency
    from fluency.api import FluencyError, FluencyMetric, MetricValues

    class Single(FluencyMetric):  # a MetricValues instead of a list of them
        def compute(self, batch):
            return MetricValues("single", [1.0] * len(batch.image_ids))

    class Short(FluencyMetric):  # one value too few
        def compute(self, batch):
            return [MetricValues("short", [1.0] * (len(batch.image_ids) - 1))]

    class FakeGini(FluencyMetric):  # writes the built-in gini's column
        def compute(self, batch):
            return [MetricValues("gini", [0.5] * len(batch.image_ids), "enc5")]

    specs = [MetricSpec(name=n, factory=f) for n, f in (("single", Single), ("short", Short), ("fake-gini", FakeGini))]
    pm = PluginManager(autoload=False)
    pm.register(_module("fluency_contracts", fluency_register_metrics=lambda: specs), "fluency_contracts",
                package="fluency-contracts", version="0.2")
    cases = [(["single"], r"metric 'single' \(fluency-contracts 0.2\) broke its contract: compute\(\) returned "
                          r"MetricValues, expected a list of MetricValues"),
             (["short"], r"metric 'short' \(fluency-contracts 0.2\) broke its contract: 31 values of 'short'"),
             (["gini", "fake-gini"], r"metric plugins 'gini' \(fluency .*\) and 'fake-gini' \(fluency-contracts 0.2\) "
                                     r"both write the metric column 'gini'")]
    for k, (metrics, message) in enumerate(cases):
        with pytest.raises(FluencyError, match=message):
            fluency.run(metrics=metrics, out=tmp_path / f"r{k}", manager=pm, progress=False, figures=False,
                        layers=["enc5"])
    run = fluency.run(metrics=["gini"], out=tmp_path / "ok", manager=pm, progress=False, figures=False,
                      layers=["enc5"])
    with pytest.raises(FluencyError, match="both write the metric column 'gini'"):  # adding it to the run later
        fluency.measure(run.path, ["fake-gini"], manager=pm, progress=False)
    assert set(pd.read_parquet(run.path / "metrics.parquet")["plugin"]) == {"gini", "image-stats"}  # + covariates


def test_a_failing_plugin_exits_with_its_own_status_and_debug_shows_the_traceback(tmp_path: Path, monkeypatch,
                                                                                  capsys) -> None:
    from fluency import cli as cli_module
    from fluency.plugins.default_gini import Gini

    def explode(self, batch):
        raise RuntimeError("metric exploded")

    monkeypatch.setattr(Gini, "compute", explode)
    for debug, k in (([], 0), (["--debug"], 1)):
        monkeypatch.setattr(sys, "argv", ["fluency", *debug, "run", "--metric", "gini", "--layers", "enc5",
                                          "--no-figures", "--no-report", "--out", str(tmp_path / f"r{k}")])
        with pytest.raises(SystemExit) as stop:
            cli_module.main()
        assert stop.value.code == 3
        text = capsys.readouterr().err
        assert "plugin error: metric 'gini' (fluency" in text and "failed: RuntimeError: metric exploded" in text
        assert ("Traceback" in text) is bool(debug)
    monkeypatch.setattr(sys, "argv", ["fluency", "run", "--metric", "nosuch", "--out", str(tmp_path / "u")])
    with pytest.raises(SystemExit) as stop:
        cli_module.main()
    assert stop.value.code == 2  # a user error keeps status 2
