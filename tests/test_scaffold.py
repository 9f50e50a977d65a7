"""``fluency plugins new KIND NAME``: a package for each kind that installs with pip, is listed by ``fluency plugins``,
passes its own tests as generated and runs through the fluency command; refusals are one line with exit status 2
and write nothing."""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from fluency.api import PLUGIN_API_VERSION
from fluency.cli import cli, main
from fluency.core.version import __version__
from fluency.scaffold import new_plugin
from plugin_env import PluginEnv, check_output

#: a name for the plugin of each kind
NAMES = {"metric": "mean-abs", "analysis": "kendall", "architecture": "tiny-vae", "constraint": "l2_activation",
         "optimizer": "nesterov"}
FILES = ["pyproject.toml", "README.md", ".gitignore", "src/{package}/__init__.py", "src/{package}/plugin.py",
         "tests/test_plugin.py"]


def package(name: str) -> str:
    return "fluency_" + name.replace("-", "_")


def tree(folder: Path) -> list[str]:
    """Every path under ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("kind", list(NAMES))
def test_new_writes_a_package_of_each_kind(kind: str, tmp_path: Path) -> None:
    name = NAMES[kind]
    target = tmp_path / "pkg"
    result = CliRunner().invoke(cli, ["plugins", "new", kind, name, "--dir", str(target)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    files = [f.format(package=package(name)) for f in FILES + (["src/{package}/model.py"] if kind == "architecture" else [])]
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(files)
    lines = result.output.splitlines()
    assert lines[0] == (f"Wrote the {kind} plugin {name!r} (package fluency-{name}, import {package(name)}) "
                        f"in {target}/:")
    steps = ["Next steps:", f"  cd {target}", '  pip install -e ".[test]"      # the plugin, editable, and pytest',
             f"  fluency plugins {name}", "  pytest"]
    assert lines[-5:] == steps
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["project"]["name"] == f"fluency-{name}"
    assert project["project"]["dependencies"][0] == f"fluency>={__version__}"
    assert project["project"]["entry-points"]["fluency"] == {name: f"{package(name)}.plugin"}
    assert project["project"]["optional-dependencies"]["test"][0] == "pytest>=8"
    plugin = (target / "src" / package(name) / "plugin.py").read_text()
    assert f'FLUENCY_PLUGIN_API = "{PLUGIN_API_VERSION}"' in plugin and f'name="{name}"' in plugin
    for source in target.rglob("*.py"):  # valid Python that imports from fluency only what a plugin may
        nodes = list(ast.walk(ast.parse(source.read_text())))
        modules = {node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        modules |= {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        from_fluency = {module for module in modules if module.split(".")[0] == "fluency"}
        assert from_fluency <= {"fluency.api", "fluency.blocks", "fluency.testing"}, (source, from_fluency)
    readme = (target / "README.md").read_text()
    assert f"fluency plugins {name}" in readme and "docs/plugins.md" in readme and "pytest" in readme
    assert "$" not in readme + plugin  # every placeholder filled


def test_the_default_folder_is_fluency_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["plugins", "new", "metric", "my-metric"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fluency-my-metric" / "src" / "fluency_my_metric" / "plugin.py").is_file()
    assert "  cd fluency-my-metric" in result.output.splitlines()
    (tmp_path / "empty").mkdir()
    made = new_plugin("optimizer", "my-opt", tmp_path / "empty")  # an empty folder may be used
    assert made.distribution == "fluency-my-opt" and (tmp_path / "empty" / "pyproject.toml").is_file()


def fluency_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the ``fluency`` command in-process; its exit status and what it printed (stdout must stay empty)."""
    monkeypatch.setattr(sys, "argv", ["fluency", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    printed = capsys.readouterr()
    assert printed.out == ""
    return stopped.value.code, printed.err


@pytest.mark.parametrize("args, message", [
    (["metric", "new-one", "--dir", "taken"],
     r"^error: taken exists and is not empty; choose another --dir or remove it$"),
    (["metric", "new-one", "--dir", "taken/notes.txt"], r"^error: taken/notes.txt exists and is not a folder"),
    (["metric", "Bad Name"], r"^error: invalid metric name 'Bad Name': use lowercase letters, digits, '-' or '_'$"),
    (["analysis", "2nd"], r"^error: invalid analysis name '2nd'"),
    (["metric", "gini"],
     r"^error: metric 'gini' is a built-in fluency plugin; choose another name \(built-in metrics: .*\)$"),
    (["architecture", "vae-small"], r"^error: architecture 'vae-small' is a built-in fluency plugin"),
    (["optimizer", "adam", "--dir", "elsewhere"], r"^error: optimizer 'adam' is a built-in fluency plugin"),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(args: list[str], message: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    code, err = fluency_fails(monkeypatch, capsys, "plugins", "new", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and re.search(message, err.strip()), err
    assert tree(tmp_path) == before


def test_plugins_still_lists_with_a_pattern_and_options_after_it() -> None:
    result = CliRunner().invoke(cli, ["plugins", "g*", "--kind", "metric", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [(r["kind"], r["name"]) for r in json.loads(result.output)] == [("metric", "gini"), ("metric", "grad-norm")]
    usage = CliRunner().invoke(cli, ["plugins", "new", "--help"], prog_name="fluency").output
    assert usage.startswith("Usage: fluency plugins new [OPTIONS] KIND NAME")


# -- the five packages installed with pip -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> PluginEnv:
    """One environment with the five generated packages: three installed as wheels, two editable (as the next
    steps say), in one pip call."""
    root = tmp_path_factory.mktemp("scaffold")
    made = {kind: new_plugin(kind, name, root / f"fluency-{name}") for kind, name in NAMES.items()}
    environment = PluginEnv(root / "venv")
    environment.pip_install(made["metric"].directory, made["analysis"].directory, made["architecture"].directory,
                            "-e", made["constraint"].directory, "-e", made["optimizer"].directory)
    environment.made = made  # type: ignore[attr-defined]
    return environment


def test_fluency_lists_the_five_plugins_with_their_packages(env: PluginEnv) -> None:
    listed = json.loads(check_output(env.fluency("plugins", "--json"), "fluency plugins --json"))
    rows = {(r["kind"], r["name"]): r for r in listed}
    for kind, name in NAMES.items():
        row = rows[(kind, name)]
        assert (row["package"], row["version"], row["status"]) == (f"fluency-{name}", "0.1.0", "ok"), row


def test_the_five_packages_pass_their_own_tests(env: PluginEnv) -> None:
    made = env.made  # type: ignore[attr-defined]
    folders = [made[kind].directory / "tests" for kind in NAMES]
    # one run: the five test modules share a name (tests/test_plugin.py), hence importlib mode
    out = check_output(env.pytest(folders[0], *map(str, folders[1:]), "--import-mode=importlib", "-rA",
                                  cwd=folders[0].parents[1]), "the generated packages' own tests")
    passed = set(re.findall(r"^PASSED \S+::(test_\w+)", out, re.MULTILINE))
    assert {f"test_the_{kind}_meets_fluencys_contract" for kind in NAMES} <= passed, out[-3000:]
    assert re.search(r"^(\d+) passed in ", out, re.MULTILINE) and len(passed) >= 3 * len(NAMES), out[-3000:]


def test_the_generated_metric_and_analysis_run_on_the_embedded_default(env: PluginEnv, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = check_output(env.fluency("run", "--metric", NAMES["metric"], "--analysis", NAMES["analysis"], "--no-report",
                                   "--no-figures", "--out", str(run), "--json", cwd=tmp_path), "fluency run")
    summary = json.loads(out)
    assert summary["status"] == "complete" and summary["metric_rows"] == 240 * 5 + 240 * 5  # + the covariates
    metrics = pd.read_parquet(run / "metrics.parquet")
    metrics = metrics[metrics["plugin"] != "image-stats"]
    assert set(metrics["metric"]) == {NAMES["metric"]} and (metrics["value"] >= 0).all()
    assert set(metrics["layer"]) == {"enc1", "enc2", "enc3", "enc4", "enc5"}
    rows = summary["strongest"]  # the analysis' declared effect size makes tau a ranked correlation
    assert {(r["analysis"], r["metric"], r["statistic"], r["kind"]) for r in rows} == {
        (NAMES["analysis"], NAMES["metric"], "tau", "correlation")}
    assert len(rows) == 5 and all(-1 <= r["estimate"] <= 1 and 0 <= r["p"] <= 1 for r in rows)


def test_the_generated_architecture_trains_with_the_generated_optimizer_and_constraint(env: PluginEnv,
                                                                                       tmp_path: Path) -> None:
    check_output(env.fluency("demo", "export", str(tmp_path / "demo"), "--n", "16"), "fluency demo export")
    train = env.fluency("train", "--arch", NAMES["architecture"], "--optimizer", NAMES["optimizer"], "--constraint",
                        NAMES["constraint"], "-o", f"{NAMES['constraint']}.weight=0.01", "--images",
                        str(tmp_path / "demo" / "images"), "--epochs", "1", "--batch-size", "8", "--image-size", "16",
                        "--out", str(tmp_path / "model"), "--no-figures", "--json", cwd=tmp_path)
    history = json.loads(check_output(train, "fluency train"))["history"]
    assert history[0]["loss"] > 0 and history[0][NAMES["constraint"]] > 0, history
