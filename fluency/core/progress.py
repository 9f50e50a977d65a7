"""Rich progress bars for every long step, on stderr so ``--json`` output stays clean."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: between a step and what it works on: ``metrics · default``
SEP = " · "


class _Bars(Progress):
    """A ``Progress`` that, when its step fails, drops the bars it had not finished before it stops.

    A refusal raised while a model loads then stays the one line of its message: the unfinished bar
    (``metrics · model 0/?  loading the model``) is not printed above it when stderr is not a terminal.
    """

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            for task in list(self.tasks):
                if not task.finished:
                    self.remove_task(task.id)
        super().__exit__(exc_type, exc, tb)


def progress_bar(console: Console | None = None) -> Progress:
    """A progress display with a free-text ``status`` field per task.

    Descriptions and statuses are plain text, never rich markup, so a label such as ``[face_sex=male]``
    or a checkpoint named ``run[2]`` is shown as it is.
    """
    return _Bars(
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
