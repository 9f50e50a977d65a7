"""The two example plugin packages under examples/, installed with pip into an environment of their own (with
their real dependencies from the package index), pass their own tests and run through the fluency command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugin_env import EXAMPLES, PluginEnv, check_output, copy_package


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> PluginEnv:
    root = tmp_path_factory.mktemp("examples")
    environment = PluginEnv(root / "venv")
    packages = [copy_package(EXAMPLES / name, root / name) for name in ("fluency-mutual-info", "fluency-flows")]
    environment.pip_install(*packages)
    environment.packages = {p.name: p for p in packages}  # type: ignore[attr-defined]
    return environment


def test_fluency_lists_the_example_plugins_with_their_packages(env: PluginEnv) -> None:
    listed = json.loads(check_output(env.fluency("plugins", "--json"), "fluency plugins --json"))
    rows = {(p["kind"], p["name"]): p for p in listed}
    for kind, name, package in [("metric", "activation-entropy", "fluency-mutual-info"),
                                ("metric", "mutual-info", "fluency-mutual-info"),
                                ("analysis", "layer-mi", "fluency-mutual-info"),
                                ("architecture", "glow-small", "fluency-flows")]:
        row = rows[(kind, name)]
        assert row["package"] == package and row["status"] == "ok", row


def test_the_mutual_info_package_passes_its_own_tests(env: PluginEnv) -> None:
    package = env.packages["fluency-mutual-info"]  # type: ignore[attr-defined]
    check_output(env.pytest(package / "tests"), "fluency-mutual-info's tests")


def test_mutual_info_runs_on_the_embedded_default(env: PluginEnv, tmp_path: Path) -> None:
    out = check_output(env.fluency("run", "--metric", "mutual-info", "--analysis", "layer-mi", "--no-report",
                                   "--out", str(tmp_path / "run"), "--json", cwd=tmp_path), "fluency run mi")
    summary = json.loads(out)
    rows = summary["other_effects"]["descriptive"]
    assert {r["layer"] for r in rows} == {"enc1", "enc2", "enc3", "enc4", "enc5"}
    assert all(r["statistic"] == "mi_bits" and r["estimate"] > 0 for r in rows)


def test_the_flows_package_passes_its_own_tests(env: PluginEnv) -> None:
    package = env.packages["fluency-flows"]  # type: ignore[attr-defined]
    check_output(env.pytest(package / "tests"), "fluency-flows's tests")


def test_glow_small_trains_and_is_measured_with_a_builtin_metric(env: PluginEnv, tmp_path: Path) -> None:
    check_output(env.fluency("demo", "export", str(tmp_path / "demo"), "--n", "16"),
                 "fluency demo export")
    images = tmp_path / "demo" / "images"
    train = env.fluency("train", "--arch", "glow-small", "--images", str(images), "--epochs", "1",
                        "--batch-size", "8", "--image-size", "16", "--out", str(tmp_path / "glow"),
                        "-o", "glow-small.steps=2", "-o", "glow-small.hidden_channels=16", "--no-figures", "--json")
    history = json.loads(check_output(train, "fluency train --arch glow-small"))["history"]
    assert history[0]["nll_bpd"] > 0 and "kl" not in history[0]
    run = env.fluency("run", "--checkpoint", str(tmp_path / "glow" / "final.pt"), "--images", str(images),
                      "--metric", "gini", "--no-report", "--out", str(tmp_path / "run"), "--json", cwd=tmp_path)
    check_output(run, "fluency run --metric gini on glow-small")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["inputs"]["checkpoints"][0]["architecture"]["name"] == "glow-small"
    no_decoder = env.fluency("run", "--checkpoint", str(tmp_path / "glow" / "final.pt"), "--images", str(images),
                             "--metric", "recon-error", "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert no_decoder.returncode == 2 and "a flow model without" in no_decoder.stderr


def test_the_example_packages_and_generated_plugins_use_only_the_public_api(tmp_path: Path) -> None:
    import ast

    from fluency.scaffold import new_plugin

    for kind in ("metric", "analysis", "architecture", "constraint", "optimizer"):
        new_plugin(kind, f"my-{kind}", tmp_path / kind)
    files = [*EXAMPLES.rglob("*.py"), *tmp_path.rglob("*.py")]
    private = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            private += [f"{file}: {n}" for n in names
                        if n == "fluency.core" or n.startswith(("fluency.core.", "fluency.plugins"))]
    assert len(files) > 20 and private == []
