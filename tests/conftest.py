"""Shared fixtures: a fresh plugin manager, the shared data folders, a tiny trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
LONDON_FACES = Path(os.environ.get("FLUENCY_LONDON_FACES", SHARED / "datasets" / "london-faces"))


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from a fresh process-wide plugin manager and no plugin environment variables."""
    from fluency.core.plugin.manager import reset_plugin_manager

    for var in ("FLUENCY_DISABLE_PLUGIN_AUTOLOAD", "FLUENCY_BLOCK_PLUGINS", "FLUENCY_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def manager():
    from fluency.core.plugin.manager import PluginManager

    return PluginManager(autoload=False)


@pytest.fixture
def london_faces() -> Path:
    if not (LONDON_FACES / "ratings.csv").exists():
        pytest.skip(f"the London faces set is not at {LONDON_FACES} (set FLUENCY_LONDON_FACES to its folder)")
    return LONDON_FACES


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001 — pytest's hook
    """After a session that ran the docs test: the documented commands that no test runs, and why."""
    if not any(r.nodeid.startswith("tests/test_doc_commands.py") for reports in terminalreporter.stats.values()
               for r in reports if hasattr(r, "nodeid")):
        return
    from test_doc_commands import exempt_commands

    terminalreporter.section("documented commands exempt from the docs test")
    for where, command, reason in exempt_commands():
        terminalreporter.write_line(f"{where}: {command[:70]}{'…' if len(command) > 70 else ''}\n    ({reason})")
