"""Exceptions that carry a message meant for the user.

Everything the CLI reports as a one-line error derives from :class:`FluencyError`;
any other exception is a bug and is shown with a traceback.
"""

from __future__ import annotations


class FluencyError(Exception):
    """An error with a message that tells the user what went wrong and how to fix it."""


class OptionError(FluencyError):
    """An unknown, ambiguous or mistyped plugin option."""


class PluginError(FluencyError):
    """A plugin that is unknown, broken, blocked or clashing with another one."""


class PluginFailure(FluencyError):
    """Plugin code that failed, or broke its contract, while fluency used it: the plugin's fault, not the
    user's (the command line exits with status 3 instead of 2)."""


class TaskFailure(FluencyError):
    """A unit of work that failed on every try for a reason that is not one of fluency's one-line errors (a bug,
    a lost node): reported in one line, and the command line exits with status 1, as for a bug."""


class InputError(FluencyError):
    """Bad user input: an unreadable image, a malformed ratings table, a missing file."""


class CheckpointError(FluencyError):
    """A checkpoint that cannot be read or names an unavailable architecture."""


class StoreError(FluencyError):
    """An activation store that is incomplete, corrupt or of an unknown format."""


class StorageFullError(FluencyError):
    """The disk filled up (or a file-size or quota limit was reached) while fluency wrote a file."""


class TrainingError(FluencyError):
    """Training that cannot go on (e.g. a NaN or infinite loss)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, systemd and ``kill`` send), raised like Ctrl-C's KeyboardInterrupt so that work stops
    the same way: a run is recorded as ``interrupted`` and keeps what it finished (the command line exits with
    143 instead of 130)."""


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (a multi-line message joined), cut at ``limit`` characters: how fluency
    names an unexpected error of plugin code in a one-line message."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
