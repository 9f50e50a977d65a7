"""The plugin-author guide runs as written: every code block of docs/plugins.md is executed, in order, in an
environment of its own; and the generated API reference matches the docstrings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from plugin_env import REPO, PluginEnv

GUIDE = REPO / "docs" / "plugins.md"
BLOCK = re.compile(r"(?:<!-- file: (?P<file>[^ ]+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks(text: str) -> list[tuple[str, str | None, str]]:
    """``(language, file or None, code)`` of every fenced block, in order."""
    return [(m["lang"], m["file"], m["code"]) for m in BLOCK.finditer(text)]


def shims(env: PluginEnv) -> Path:
    """``fluency``, ``pip`` and ``pytest`` commands that run in ``env``, as a user's shell would have them."""
    folder = env.root / "shims"
    folder.mkdir(exist_ok=True)
    commands = {"fluency": "-m fluency.cli", "pip": "-m pip --disable-pip-version-check",
                "pytest": "-m pytest -p no:cacheprovider", "python": ""}
    for name, args in commands.items():
        path = folder / name
        path.write_text(f'#!/bin/sh\nexec "{env.python}" {args} "$@"\n')
        path.chmod(0o755)
    return folder


def test_every_code_block_of_the_plugin_guide_runs(tmp_path: Path) -> None:
    env = PluginEnv(tmp_path / "venv")
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("FLUENCY_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ.update(PATH=f"{shims(env)}{os.pathsep}{environ['PATH']}", PYTHONDONTWRITEBYTECODE="1")
    cwd = tmp_path / "work"
    cwd.mkdir()
    found = blocks(GUIDE.read_text(encoding="utf-8"))
    assert sum(lang == "bash" for lang, _, _ in found) >= 2 and any(f for _, f, _ in found)
    for number, (lang, file, code) in enumerate(found, 1):
        where = f"docs/plugins.md block {number} ({lang}{', ' + file if file else ''})"
        if file:
            (cwd / file).parent.mkdir(parents=True, exist_ok=True)
            (cwd / file).write_text(code, encoding="utf-8")
        elif lang == "bash":
            script = f"set -e\n{code}\npwd > {tmp_path / 'cwd'}\n"
            proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=environ, capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, f"{where} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            cwd = Path((tmp_path / "cwd").read_text().strip())
        elif lang == "python":
            proc = subprocess.run([str(env.python), "-c", code], cwd=cwd, env=environ, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, f"{where} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        elif lang == "toml":
            tomllib.loads(code)
        else:
            assert lang == "text", f"{where}: unknown block language {lang!r} (use bash, python, toml or text)"


def test_the_api_reference_is_generated_from_the_current_docstrings() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "make_reference.py")], capture_output=True, text=True,
                          timeout=300, check=True)
    committed = (REPO / "docs" / "plugin-reference.md").read_text(encoding="utf-8")
    assert proc.stdout == committed, ("docs/plugin-reference.md is out of date: run "
                                      "`python docs/make_reference.py > docs/plugin-reference.md`")


@pytest.mark.parametrize("text, expected", [
    ("```bash\nls\n```\n<!-- file: a/b.py -->\n```python\nx = 1\n```\n", [("bash", None, "ls\n"),
                                                                        ("python", "a/b.py", "x = 1\n")]),
])
def test_blocks_are_found_with_their_target_files(text: str, expected: list) -> None:
    assert blocks(text) == expected
