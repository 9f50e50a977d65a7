"""Rich progress bars for every long step, on stderr so ``--json`` output stays clean."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Column
from rich.text import Text

#: between a step and what it works on: ``metrics · default``
SEP = " · "
#: the columns a bar's counts, times and a short status need beside its description
REST_WIDTH = 50


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
    or a checkpoint named ``run[2]`` is shown as it is. At 80 columns the counts and times are never cut:
    the bar narrows first, and a status too long for what is left ends in an ellipsis.
    """
    console = console or Console(stderr=True)
    whole = Column(no_wrap=True)
    return _Bars(
        _Description(max(30, console.width - REST_WIDTH)),
        BarColumn(bar_width=16),
        MofNCompleteColumn(table_column=Column(no_wrap=True, justify="right")),
        TimeElapsedColumn(table_column=whole),
        TimeRemainingColumn(table_column=whole),
        TextColumn("{task.fields[status]}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis")),
        console=console,
        transient=False,
    )


def step(name: str, label: str | None = None) -> str:
    """A task's description: the step and, when there are several, what it works on (``metrics · default``)."""
    return name if label is None else f"{name}{SEP}{label}"


def fit_description(description: str, width: int) -> str:
    """``description`` in ``width`` characters: the step whole, its label keeping both ends
    (``metrics · a-very-lo…epoch-0010``), as checkpoints of one training run differ at the end."""
    if len(description) <= width:
        return description
    name, sep, label = description.rpartition(SEP) if SEP in description else ("", "", description)
    room = max(width - len(name) - len(sep), 3)
    head = (room - 1) // 2
    return f"{name}{sep}{label[:head]}…{label[len(label) - (room - 1 - head):]}"


class _Description(ProgressColumn):
    """The task's description as plain text, shortened by :func:`fit_description` to ``width``."""

    def __init__(self, width: int) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.width = width

    def render(self, task: Task) -> Text:
        return Text(fit_description(task.description, self.width), style="bold")
