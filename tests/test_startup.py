"""The command line starts without torch (issue 14): version, help, the plugin list and every error caused
by the arguments answer in a fraction of torch's import time.

Each command runs in a fresh interpreter, which then reports whether ``torch`` is in ``sys.modules``;
third-party autoloading is off there (an installed plugin may import what it likes). The built-in plugins
are listed from ``fluency/plugins/catalog.json``, which must match what their modules register.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fluency.api
from fluency.core.plugin import catalog
from fluency.core.plugin.manager import PluginManager, read_registry
from fluency.scaffold import TEMPLATES, render

#: runs the command line with the given arguments, then prints its exit status and whether torch was imported
PROBE = """
import json, sys
from fluency.cli import main
sys.argv = ["fluency", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def probe(args: list[str], script: str = PROBE) -> dict[str, object]:
    """Exit status and torch's presence after ``fluency ARGS`` in a fresh interpreter."""
    env = {**os.environ, "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args, code", [
    (["--version"], 0),
    (["--help"], 0),
    (["run", "--help"], 0),
    (["plugins"], 0),
    (["plugins", "--json"], 0),
    (["plugins", "g*", "--kind", "metric"], 0),
    (["schema", "metric.gini"], 0),
    (["run", "--nosuch"], 2),                                      # unknown option
    (["run"], 2),                                                  # missing required --metric
    (["run", "--metric", "gini", "--batch-size", "0"], 2),         # bad value
    (["run", "--metric", "gini", "--device", "tpu"], 2),           # bad choice
    (["run", "--metric", "gini,nosuch"], 2),                       # unknown metric name
    (["run", "--metric", "gini", "--analysis", "nosuch"], 2),
    (["run", "--metric", "gini", "--model", "nosuch"], 2),
    (["measure", "no-such-folder", "--metric", "nosuch"], 2),
    (["train", "--arch", "nosuch"], 2),
    (["train", "--optimizer", "nosuch"], 2),
    (["train", "--constraint", "nosuch"], 2),
    (["inspect", "--model", "nosuch"], 2),
    (["run", "--metric", "gini", "-o", "gini.nosuch=1"], 2),          # unknown option of a plugin
    (["run", "--metric", "gini", "-o", "sam.rho=abc"], 2),            # a value of the wrong type
    (["run", "--metric", "gini", "-o", "vae-small.latent_dm=3"], 2),  # an architecture's option
    (["run", "--metric", "gini", "-o", "no-equals-sign"], 2),         # not an assignment
    (["run", "--metric", "gini", "-o", "gni.layers=[enc1]"], 2),      # no plugin of that name
    (["train", "--images", "x", "--out", "y", "-o", "adam.beta=0.5"], 2),
    (["compare", "a", "b", "--metric", "ssm"], 2),                    # unknown distance
    (["runs", "--help"], 0),
    (["query", "--help"], 0),
    (["runs", "no-such-folder"], 2),
    (["query", "select 1", "no-such-folder"], 2),
])
def test_command_answers_without_importing_torch(args: list[str], code: int) -> None:
    assert probe(args) == {"code": code, "torch": False}


@pytest.mark.parametrize("args", [["runs"], ["runs", "--json"], ["query", "select 1"],
                                  ["query", "select * from metrics, analyses, runs", "--format", "json"]])
def test_listing_and_querying_runs_answer_without_importing_torch(args: list[str], tmp_path: Path) -> None:
    """``fluency runs`` and ``fluency query`` over an empty folder (tests/test_query.py probes real runs)."""
    assert probe([*args, str(tmp_path)]) == {"code": 0, "torch": False}


def test_the_probe_sees_torch_when_it_is_imported() -> None:
    """The check can fail: a command that imports torch is reported as such."""
    assert probe(["--version"], "import torch\n" + PROBE) == {"code": 0, "torch": True}


def test_catalog_matches_the_builtin_plugins() -> None:
    expected = catalog.catalog_text(read_registry()["plugins"]["modules"])
    assert catalog.CATALOG_PATH.read_text(encoding="utf-8") == expected, \
        "fluency/plugins/catalog.json is stale: run `python -m fluency.core.plugin.catalog`"


def test_catalogued_plugins_are_the_imported_ones() -> None:
    """Listed from the catalog or imported, the built-ins are the same records, specs and factories."""
    listed, imported = PluginManager(autoload=False).list(), PluginManager(autoload=False, catalog=False).list()
    assert [r.as_dict() for r in listed] == [r.as_dict() for r in imported]
    for lazy, real in zip(listed, imported):
        assert lazy.plugin == real.plugin and isinstance(lazy.spec.factory, str)
        assert lazy.spec == dataclasses.replace(real.spec, factory=lazy.spec.factory)
        assert lazy.spec.load() is real.spec.load()


def test_an_edited_module_is_imported_not_read_from_a_stale_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    module = "fluency.plugins.default_gini"
    assert catalog.catalogued_specs(module) is not None
    assert PluginManager(autoload=False).pm.get_plugin(module) is None  # listed, not imported
    monkeypatch.setattr(catalog, "source_digest", lambda name: "edited")
    assert catalog.catalogued_specs(module) is None
    manager = PluginManager(autoload=False)
    assert manager.pm.get_plugin(module) is not None and manager.get("metric", "gini").name == "gini"


def test_public_api_names_all_resolve() -> None:
    assert [name for name in fluency.api.__all__ if not hasattr(fluency.api, name)] == []


#: imports each generated plugin module and calls its registration hooks, then reports torch's presence
TEMPLATE_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import importlib
found = {}
for package in sys.argv[2:]:
    module = importlib.import_module(package + ".plugin")
    hooks = [getattr(module, n) for n in dir(module) if n.startswith("fluency_register_")]
    found[package] = [spec.name for hook in hooks for spec in hook()]
print(json.dumps({"specs": found, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_scaffolded_plugins_register_without_importing_torch(tmp_path: Path) -> None:
    """Every kind's template (``fluency plugins new``) imports torch only where it computes."""
    packages = []
    for kind in TEMPLATES:
        name = f"startup-{kind}"
        for relative, text in render(kind, name).items():
            if relative.startswith("src/"):
                path = tmp_path / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
        packages.append("fluency_" + name.replace("-", "_"))
    report = probe([str(tmp_path / "src"), *packages], TEMPLATE_PROBE)
    assert report == {"specs": {p: [p.removeprefix("fluency_").replace("_", "-")] for p in packages},
                      "torch": False}
