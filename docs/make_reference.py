"""Write the plugin API reference (docs/plugin-reference.md) from the docstrings of the public modules.

    python docs/make_reference.py > docs/plugin-reference.md

A test runs this and fails when the committed file differs, so the reference cannot drift from the code;
another fails when a public name has no docstring.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import fluency
import fluency.api
import fluency.blocks
import fluency.testing
from fluency.core.plugin import hookspecs

MODULES = (fluency.api, fluency.testing, fluency.blocks)


def _doc(obj: Any) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "")


def _signature(obj: Any) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r"<object object at 0x[0-9a-f]+>", "<unset>", text)  # sentinels: no address in the docs


def _members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined by ``cls`` itself (not inherited from torch or object)."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(value, property) or inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod)):
            out.append((name, value))
    return out


def _entry(name: str, obj: Any) -> list[str]:
    if inspect.isclass(obj):
        lines = [f"### `{name}`", "", f"class `{name}{_signature(obj) if not issubclass(obj, BaseException) else ''}`",
                 "", _doc(obj), ""]
        for member, value in _members(obj):
            func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            sig = "" if isinstance(value, property) else _signature(func)
            lines += [f"- `{member}{sig}`" + (f": {_doc(func).splitlines()[0]}" if _doc(func) else ""), ""]
        return lines
    if callable(obj):
        return [f"### `{name}{_signature(obj)}`", "", _doc(obj), ""]
    return [f"### `{name}`", "", f"`{obj!r}`" if isinstance(obj, (str, int, float, tuple)) else "", ""]


def reference() -> str:
    """The whole reference as Markdown."""
    lines = ["# Plugin API reference", "",
             "Generated from the docstrings by `python docs/make_reference.py > docs/plugin-reference.md`; "
             "do not edit by hand. The guide is [plugins.md](plugins.md).", "",
             f"Plugin API version: `{fluency.api.PLUGIN_API_VERSION}`.", "", "## Hooks", "",
             _doc(hookspecs).split("\n\nExample")[0], ""]
    for hook in hookspecs.REGISTRATION_HOOKS.values():
        lines += [f"### `{hook}{_signature(getattr(hookspecs, hook))}`", "", _doc(getattr(hookspecs, hook)), ""]
    for module in MODULES:
        lines += [f"## `{module.__name__}`", "", _doc(module), ""]
        for name in module.__all__:
            lines += _entry(name, getattr(module, name))
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
