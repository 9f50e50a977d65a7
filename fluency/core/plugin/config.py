"""Resolve the options of the plugins one command uses, from every source at once.

Layers, lowest priority first: the option's declared default, ``registry.toml``
(``[defaults.KIND.NAME]``), the ``--config`` TOML file (a table ``[NAME]`` or
``[KIND.NAME]`` per plugin), and ``-o [KIND.]NAME.KEY=VALUE`` assignments.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fluency.core.errors import OptionError
from fluency.core.plugin.manager import PluginManager
from fluency.core.plugin.options import OptionAssignment, parse_assignment
from fluency.core.plugin.specs import KINDS, Kind, PluginSpec

PluginKey = tuple[Kind, str]
#: top-level tables of a ``--config`` file that configure fluency itself, never a plugin
#: (``[slurm]``: the SLURM executor's settings, read by ``fluency.core.run.slurm``)
RESERVED_TABLES = ("slurm",)


def read_config(path: str | Path | None) -> dict[str, Any]:
    """Parse a ``--config`` TOML file; a missing, unreadable, non-UTF-8 or malformed file is one line naming it."""
    if path is None:
        return {}
    if Path(path).is_dir():
        raise OptionError(f"--config {path}: is a folder; give a TOML file")
    try:
        text = Path(path).read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise OptionError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise OptionError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise OptionError(f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"--config {path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise OptionError(f"--config {path}: not valid TOML: arrays or tables nested too deeply") from None


def _target(kind: str | None, name: str, used: Sequence[PluginKey], source: str) -> PluginKey | None:
    matches = [key for key in used if key[1] == name and (kind is None or key[0] == kind)]
    if len(matches) > 1:
        kinds = " or ".join(f"{k}.{name}" for k, _ in matches)
        raise OptionError(f"{source}: {name!r} is ambiguous in this command; write {kinds}")
    return matches[0] if matches else None


def resolve_plugin_options(
    manager: PluginManager,
    used: Sequence[PluginKey],
    assignments: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    config_name: str = "--config",
    ignore_tables: Sequence[str] = (),
) -> dict[PluginKey, dict[str, Any]]:
    """Validated options for each (kind, name) in ``used``.

    ``assignments`` are raw ``-o`` strings. A config table or ``-o`` that names a
    plugin of another command (a training optimizer in a ``run`` config, say) is
    ignored; one that names no known plugin at all is an error. The tables of
    :data:`RESERVED_TABLES` are not plugin tables and are skipped.
    """
    layers: dict[PluginKey, list[dict[str, Any]]] = {
        key: [manager.option_defaults(*key)] for key in used
    }

    def known_anywhere(kind: str | None, name: str) -> bool:
        kinds = [kind] if kind else list(KINDS)
        return any(name in manager.names(k) for k in kinds)  # type: ignore[arg-type]

    for table, value in (config or {}).items():
        if table in ignore_tables or table in RESERVED_TABLES:
            continue
        if table in KINDS and isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            entries = [(table, n, v) for n, v in value.items()]
        elif isinstance(value, dict):
            entries = [(None, table, value)]
        else:
            raise OptionError(f"{config_name}: top-level key {table!r} must be a table like [{table}]")
        for kind, name, opts in entries:
            key = _target(kind, name, used, f"{config_name} [{table}]")
            if key is not None:
                layers[key].append(dict(opts))
            elif not known_anywhere(kind, name):
                raise OptionError(f"{config_name}: table [{table}] names no known plugin")

    parsed: list[OptionAssignment] = [parse_assignment(a, KINDS) for a in assignments]
    for a in parsed:
        key = _target(a.kind, a.plugin, used, f"-o {a.text}")
        if key is None:
            where = f"{a.kind} {a.plugin!r}" if a.kind else repr(a.plugin)
            in_use = ", ".join(f"{k}.{n}" for k, n in used) or "none"
            raise OptionError(f"-o {a.text}: {where} is not used by this command (plugins in use: {in_use})")
        layers[key].append({a.key: a.value})

    out: dict[PluginKey, dict[str, Any]] = {}
    for key in used:
        spec: PluginSpec = manager.get(*key)
        out[key] = spec.resolve(*layers[key])
    return out
