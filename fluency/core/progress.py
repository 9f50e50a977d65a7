"""Rich progress bars for every long step, on stderr so ``--json`` output stays clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: between a step and what it works on: ``metrics · default``
SEP = " · "


def progress_bar(console: Console | None = None) -> Progress:
    """A progress display with a free-text ``status`` field per task.

    Descriptions and statuses are plain text, never rich markup, so a label such as ``[face_sex=male]``
    or a checkpoint named ``run[2]`` is shown as it is.
    """
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", markup=False),
        console=console or Console(stderr=True),
        transient=False,
    )


def step(name: str, label: str | None = None) -> str:
    """A task's description: the step and, when there are several, what it works on (``metrics · default``)."""
    return name if label is None else f"{name}{SEP}{label}"
