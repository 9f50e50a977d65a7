"""Run the real ``fluency`` entry point in the test's own process (no interpreter start, no torch import: fast)."""

from __future__ import annotations

import sys

import pytest


def fluency_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str,
                columns: int = 200) -> tuple[int, str, str]:
    """``fluency ARGS`` through :func:`fluency.cli.main` in a terminal ``columns`` wide: (exit status, stdout,
    stderr)."""
    from fluency.cli import main

    monkeypatch.setattr(sys, "argv", ["fluency", *args])
    monkeypatch.setenv("COLUMNS", str(columns))
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
