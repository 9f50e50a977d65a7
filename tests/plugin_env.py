"""A separate environment for tests that install plugin packages with pip.

The packages go into a fresh virtual environment of their own, so the rest of the suite never autoloads
them. That environment sees the test environment's packages (fluency, torch, pytest) through a ``.pth``
file, so pip installs only what a package adds, with its real dependencies from the package index (a
missing one fails the install: nothing is skipped).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import fluency

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


class PluginEnv:
    """A virtual environment at ``root`` layered over the running one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
        self.python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        site = Path(subprocess.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        # the running environment's packages, and fluency's source folder for an editable install
        shared = [sysconfig.get_paths()["purelib"], str(Path(fluency.__file__).resolve().parents[1])]
        (site / "_fluency_tests.pth").write_text("\n".join(dict.fromkeys(shared)) + "\n")

    def pip_install(self, *targets: str | Path) -> None:
        """``pip install`` into this environment (pip is the running environment's); fail with pip's output."""
        proc = self.run("-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                        *(str(t) for t in targets), timeout=900)
        assert proc.returncode == 0, f"pip install {targets} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    def run(self, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        """Run this environment's Python with ``args`` (plugin autoload on, no plugin environment variables)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("FLUENCY_DISABLE_PLUGIN_AUTOLOAD", "FLUENCY_BLOCK_PLUGINS", "FLUENCY_STRICT_PLUGINS",
                            "PYTHONPATH")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return subprocess.run([str(self.python), *args], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)

    def fluency(self, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        """The ``fluency`` command of this environment."""
        return self.run("-m", "fluency.cli", *args, cwd=cwd, timeout=timeout)

    def pytest(self, tests: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """A package's own test suite, run in this environment (without the repository's pytest options)."""
        return self.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tests), *args,
                        cwd=cwd or tests.parent, timeout=900)


def copy_package(source: Path, target: Path) -> Path:
    """A copy of a package folder without build leftovers, so pip builds in a temporary place, not the repo."""
    import shutil

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return target


def check_output(proc: subprocess.CompletedProcess[str], what: str, codes: Sequence[int] = (0,)) -> str:
    """``proc``'s stdout, after asserting its exit code (with its output in the message)."""
    assert proc.returncode in codes, f"{what}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout
