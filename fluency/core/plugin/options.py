"""Typed, validated plugin options.

A plugin declares its options as :class:`Option` objects. Values arrive from four
layers, lowest first: the option's own default, ``registry.toml``, a ``--config``
TOML file, and ``-o PLUGIN.KEY=VALUE`` on the command line. Every value is checked
against the declared type before a plugin sees it, so a typo is an error instead of
a silently ignored setting.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fluency.core.errors import OptionError

_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "bool": bool,
    "str": str,
    "int|str": (int, str),  # a number or a word, e.g. an image size or "native"
    "list[str]": list,
    "list[int]": list,
    "list[float]": list,
}


_DECLARED: Any = object()  # "no other default": describe() shows the declared one


#: seeds are in [0, 2**32): numpy's legacy seeding, which fluency also seeds, takes nothing larger
SEED_LIMIT = 2**32


def check_seed(seed: Any, where: str = "--seed") -> int:
    """``seed`` as an int in [0, 2**32), or an :class:`OptionError` naming ``where``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise OptionError(f"{where} {seed!r}: use a whole number from 0 to {SEED_LIMIT - 1}")
    return seed


def brief_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a value from a hostile file cannot flood a message."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print (Python refuses over 4300 digits)
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Option:
    """One option of a plugin.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``int|str`` (either; ``minimum``/``maximum``
    then bound only the integers), ``list[str]``,
    ``list[int]`` or ``list[float]``; ``None`` as default means "not set" (the plugin
    decides). ``choices`` restricts the allowed values, ``minimum``/``maximum`` bound
    numbers (inclusive).
    """

    type: str
    default: Any = None
    help: str = ""
    choices: Sequence[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise TypeError(f"unknown option type {self.type!r}; use one of {sorted(_TYPES)}")

    def validate(self, value: Any, where: str) -> Any:
        """Return ``value`` converted to this option's type, or raise :class:`OptionError`."""
        if value is None:
            return None
        if self.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type.startswith("list["):
            if isinstance(value, str):  # from the command line: "a,b" or "[a, b]" with unquoted items
                text = value.strip()
                if text.startswith("[") and text.endswith("]"):
                    text = text[1:-1]
                items = [item.strip() for item in text.split(",") if item.strip()]
                value = items if self.type == "list[str]" else [parse_value(item) for item in items]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, list):
                raise OptionError(f"{where}: expected a list, got {brief_repr(value)}")
            inner = Option(self.type[5:-1], choices=self.choices, minimum=self.minimum, maximum=self.maximum)
            return [inner.validate(v, f"{where}[{i}]") for i, v in enumerate(value)]
        expected = _TYPES[self.type]
        if isinstance(value, bool) and self.type != "bool" or not isinstance(value, expected):
            raise OptionError(f"{where}: expected {self.type}, got {type(value).__name__} {brief_repr(value)}")
        if self.type == "float" and (value != value or value in (float("inf"), float("-inf"))):
            raise OptionError(f"{where}: {value!r} is not a finite number")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{where}: {brief_repr(value)} is not one of {list(self.choices)}")
        if self.type == "int|str" and isinstance(value, str):
            return value
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"{where}: {brief_repr(value)} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"{where}: {brief_repr(value)} is above the maximum {self.maximum}")
        return value

    def describe(self, default: Any = _DECLARED) -> dict[str, Any]:
        """A JSON-ready description (for ``fluency plugins --json`` and ``fluency schema``).

        ``default`` is the effective default where another layer (``registry.toml``) sets one;
        when it differs from the declared default, that is given too, as ``declared_default``.
        """
        effective = self.default if default is _DECLARED else default
        out: dict[str, Any] = {"type": self.type, "default": effective, "help": self.help}
        if effective != self.default or type(effective) is not type(self.default):
            out["declared_default"] = self.default
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


def resolve_options(
    declared: Mapping[str, Option], layers: Sequence[Mapping[str, Any]], where: str
) -> dict[str, Any]:
    """Merge option ``layers`` (lowest priority first) over the declared defaults and validate."""
    values = {key: opt.default for key, opt in declared.items()}
    for layer in layers:
        for key, value in layer.items():
            if key not in declared:
                hint = difflib.get_close_matches(key, list(declared), n=1)
                known = ", ".join(sorted(declared)) or "none"
                extra = f"; did you mean {hint[0]!r}?" if hint else f" (known options: {known})"
                raise OptionError(f"{where}: unknown option {brief_repr(key)}{extra}")
            values[key] = value
    return {key: declared[key].validate(value, f"{where}.{key}") for key, value in values.items()}


def parse_value(text: str) -> Any:
    """Parse a command-line value as a TOML literal (``0.1``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


@dataclass
class OptionAssignment:
    """One ``-o [KIND.]PLUGIN.KEY=VALUE`` from the command line."""

    kind: str | None
    plugin: str
    key: str
    value: Any
    text: str = field(repr=False, default="")


def parse_assignment(text: str, kinds: Sequence[str]) -> OptionAssignment:
    """Parse ``PLUGIN.KEY=VALUE`` or ``KIND.PLUGIN.KEY=VALUE`` (kind as in ``kinds``)."""
    target, sep, raw = text.partition("=")
    parts = target.strip().split(".")
    if not sep or len(parts) not in (2, 3) or not all(parts):
        raise OptionError(
            f"-o {text!r}: expected PLUGIN.KEY=VALUE or KIND.PLUGIN.KEY=VALUE (e.g. -o sam.rho=0.1)"
        )
    kind = None
    if len(parts) == 3:
        kind = parts[0]
        if kind not in kinds:
            raise OptionError(f"-o {text!r}: unknown plugin kind {kind!r}; use one of {list(kinds)}")
        parts = parts[1:]
    return OptionAssignment(kind, parts[0], parts[1], parse_value(raw.strip()), text)
