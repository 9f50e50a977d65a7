"""The plugin manager: loads built-in and third-party plugins and indexes their specs.

Built-in plugins are the modules listed in ``fluency/registry.toml``; third-party
packages advertise a module in the entry-point group ``fluency``. Both go through
the same path: register the module with pluggy, call its registration hooks,
check the returned specs and index them by (kind, name).

A plugin that fails at any step (import error, a hook pluggy rejects, an exception
or a malformed spec from a hook, a name another plugin already uses) is recorded as
``broken`` with its package, version and error; the rest keep working. Two specs
of one kind and name make both broken; two distributions advertising one
entry-point name keep the first loaded and mark the other broken. Asking for a
name it provides, or might have provided, raises a one-line :class:`PluginError`.

Built-in modules whose source matches ``fluency/plugins/catalog.json`` are not imported to be listed:
their specs come from the catalog (:mod:`fluency.core.plugin.catalog`), with lazy factories, so that
listing them and refusing an unknown name never import torch.

Environment variables:

``FLUENCY_DISABLE_PLUGIN_AUTOLOAD=1``
    do not load third-party entry points at all;
``FLUENCY_BLOCK_PLUGINS=pkg1,pkg2``
    skip these distributions (or entry-point names); they are listed as ``blocked``.
    Names are compared as pip compares distribution names (:func:`normalise_name`:
    any case, ``-``, ``_`` and ``.`` alike, spaces around commas ignored);
``FLUENCY_STRICT_PLUGINS=1``
    raise on the first broken plugin instead of recording it.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata as md
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import pluggy

from fluency.core.plugin import hookspecs
from fluency.core.plugin.catalog import catalogued_specs
from fluency.core.errors import FluencyError, OptionError, PluginError, PluginFailure, error_text
from fluency.core.plugin.specs import KINDS, SPEC_TYPES, Kind, PluginSpec
from fluency.core.version import PLUGIN_API_VERSION

T = TypeVar("T")

ENTRY_POINT_GROUP = "fluency"
REGISTRY_PATH = Path(__file__).resolve().parents[2] / "registry.toml"
Status = Literal["ok", "broken", "blocked"]


@dataclass
class PluginRecord:
    """One row of ``fluency plugins``: a registered spec, or a plugin that could not provide any."""

    kind: Kind | None
    name: str
    package: str
    version: str
    status: Status
    description: str = ""
    error: str | None = None
    spec: PluginSpec | None = None
    plugin: str = ""  # the pluggy plugin name (module or entry point)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; each option's ``default`` is the effective one (``registry.toml`` over the declared)."""
        out = {k: getattr(self, k) for k in ("kind", "name", "package", "version", "status", "description", "error")}
        out["options"] = {}
        if self.spec is not None and self.kind is not None:
            registry = PluginManager.option_defaults(self.kind, self.name)
            for key, opt in self.spec.options.items():
                if key not in registry:
                    out["options"][key] = opt.describe()
                    continue
                try:
                    value = opt.validate(registry[key], f"registry.toml [defaults.{self.kind}.{self.name}].{key}")
                except OptionError:  # shown as written; a run reports it
                    value = registry[key]
                out["options"][key] = opt.describe(value)
        return out


def normalise_name(name: str) -> str:
    """A distribution or entry-point name as compared (PEP 503): stripped, lower case, runs of ``-_.`` as ``-``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def read_registry() -> dict[str, Any]:
    """The parsed ``registry.toml`` (built-in plugin modules, option defaults, default analyses)."""
    with open(REGISTRY_PATH, "rb") as fh:
        return tomllib.load(fh)


def check_api_version(plugin: object) -> None:
    """Refuse a plugin whose ``FLUENCY_PLUGIN_API`` ("major[.minor]") this fluency does not provide: another
    major version, or a newer minor one. A plugin that declares none is assumed compatible."""
    declared = getattr(plugin, "FLUENCY_PLUGIN_API", None)
    if declared is None:
        return
    match = re.fullmatch(r"(\d+)(?:\.(\d+))?", str(declared).strip())
    if match is None:
        raise PluginError(f"incompatible: FLUENCY_PLUGIN_API = {declared!r} is not a version like '1' or '1.0'")
    have_major, have_minor = (int(x) for x in PLUGIN_API_VERSION.split("."))
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major != have_major or minor > have_minor:
        raise PluginError(f"incompatible: built for fluency plugin API {declared}, this fluency provides "
                          f"{PLUGIN_API_VERSION}; install a version of the plugin made for it")


class PluginManager:
    """Loads plugins and answers "which spec is called NAME in KIND?"."""

    def __init__(self, *, autoload: bool | None = None, strict: bool | None = None,
                 blocked: Iterable[str] | None = None, load: bool = True, catalog: bool = True) -> None:
        self.catalog = catalog  # built-ins from the catalog where it is current (False: always imported)
        self.autoload = not _env_flag("FLUENCY_DISABLE_PLUGIN_AUTOLOAD") if autoload is None else autoload
        self.strict = _env_flag("FLUENCY_STRICT_PLUGINS") if strict is None else strict
        names = os.environ.get("FLUENCY_BLOCK_PLUGINS", "").split(",") if blocked is None else blocked
        self.blocked = {normalise_name(b) for b in names if b.strip()}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self._index: dict[tuple[Kind, str], PluginRecord] = {}
        self._owners: dict[str, tuple[str, str]] = {}  # pluggy plugin name -> (package, version) that took it
        if load:
            self.load_builtins()
            if self.autoload:
                self.load_entry_points()

    # -- loading ---------------------------------------------------------
    def load_builtins(self) -> None:
        """The modules of ``registry.toml``: from the catalog where it matches the module's source, else imported."""
        from fluency.core.version import __version__

        for module_name in read_registry()["plugins"]["modules"]:
            specs = catalogued_specs(module_name) if self.catalog else None
            if specs is None:
                self.import_plugin(module_name, "fluency", __version__)
            else:
                self._load_catalogued(specs, module_name, __version__)

    def import_plugin(self, module_name: str, package: str, version: str) -> None:
        """Import a plugin module by name and register it (a failure is recorded as ``broken``)."""
        self._load(lambda: importlib.import_module(module_name), module_name, package, version)

    def _load_catalogued(self, specs: list[PluginSpec], module_name: str, version: str) -> None:
        """Index a built-in module's specs read from the catalog; the module is imported when a factory loads."""
        self._owners[module_name] = ("fluency", version)
        for spec in specs:
            try:
                spec.check()
            except ValueError as exc:
                self._broken(spec.kind, spec.name, "fluency", version, str(exc), module_name)
                continue
            self._add(PluginRecord(spec.kind, spec.name, "fluency", version, "ok", spec.summary, spec=spec,
                                   plugin=module_name))

    def load_entry_points(self) -> None:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist
            package = dist.metadata["Name"] if dist is not None else ep.value.split(":")[0]
            version = dist.version if dist is not None else "?"
            if normalise_name(package) in self.blocked or normalise_name(ep.name) in self.blocked:
                if normalise_name(ep.name) in self.blocked:
                    self.pm.set_blocked(ep.name)
                self.records.append(PluginRecord(None, ep.name, package, version, "blocked",
                                                 "blocked by FLUENCY_BLOCK_PLUGINS", plugin=ep.name))
                continue
            self._load(ep.load, ep.name, package, version)

    def register(self, plugin: object, name: str, package: str = "<local>", version: str = "0") -> None:
        """Register an in-process plugin object (a module or any object with hook functions)."""
        self._load(lambda: plugin, name, package, version)

    def _load(self, get: Any, name: str, package: str, version: str) -> None:
        first = self._owners.get(name)
        if first is not None:  # pluggy would say only "Plugin name already registered"
            self._broken(None, name, package, version,
                         f"the plugin (entry-point) name {name!r} is registered by both {first[0]} {first[1]} and "
                         f"{package} {version}; {first[0]} {first[1]} is used: uninstall one or block it with "
                         "FLUENCY_BLOCK_PLUGINS", name)
            return
        self._owners[name] = (package, version)
        plugin = None
        try:
            plugin = get()
            check_api_version(plugin)
            self._check_hook_names(plugin)
            self.pm.register(plugin, name=name)
            specs = self._call_hooks(plugin)
        except Exception as exc:  # a broken plugin must never break fluency
            if plugin is not None and self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._broken(None, name, package, version, error_text(exc), name)
            return
        for spec in specs:
            self._add(PluginRecord(spec.kind, spec.name, package, version, "ok", spec.summary, spec=spec, plugin=name))

    @staticmethod
    def _check_hook_names(plugin: object) -> None:
        known = set(hookspecs.REGISTRATION_HOOKS.values())
        for attr in dir(plugin):
            if attr.startswith("fluency_") and attr not in known and callable(getattr(plugin, attr, None)):
                raise PluginError(f"unknown hook {attr!r}; fluency's hooks are {sorted(known)}")

    def _call_hooks(self, plugin: object) -> list[PluginSpec]:
        specs: list[PluginSpec] = []
        for kind, hook_name in hookspecs.REGISTRATION_HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                result = impl.function()
                if not isinstance(result, (list, tuple)):
                    raise PluginError(f"{hook_name}() returned {type(result).__name__}, expected a list of specs")
                for spec in result:
                    if not isinstance(spec, SPEC_TYPES[kind]):
                        raise PluginError(f"{hook_name}() returned {spec!r}, expected {SPEC_TYPES[kind].__name__}")
                    spec.check()
                    specs.append(spec)
        seen: set[tuple[str, str]] = set()
        for spec in specs:
            if (spec.kind, spec.name) in seen:
                raise PluginError(f"registers the {spec.kind} {spec.name!r} twice")
            seen.add((spec.kind, spec.name))
        return specs

    def _add(self, record: PluginRecord) -> None:
        key = (record.kind, record.name)
        other = self._index.get(key)
        self.records.append(record)
        if other is None:
            self._index[key] = record
            return
        msg = (f"{record.kind} name {record.name!r} is registered by both {other.package} {other.version} "
               f"and {record.package} {record.version}; uninstall one or block it with FLUENCY_BLOCK_PLUGINS")
        for rec in (other, record):
            rec.status, rec.error = "broken", msg
        if self.strict:
            raise PluginError(msg)

    def _broken(self, kind: Kind | None, name: str, package: str, version: str, error: str, plugin: str) -> None:
        self.records.append(PluginRecord(kind, name, package, version, "broken", error=error, plugin=plugin))
        if self.strict:
            raise PluginError(f"plugin {package} {version} failed to load: {error}")

    # -- queries ---------------------------------------------------------
    def get(self, kind: Kind, name: str) -> PluginSpec:
        """The spec called ``name`` in ``kind``, or a one-line :class:`PluginError` saying why not."""
        record = self._index.get((kind, name))
        if record is not None and record.status == "ok":
            assert record.spec is not None
            return record.spec
        if record is not None:
            raise PluginError(f"{kind} {name!r} is unavailable: {record.error}")
        for rec in self.records:
            if rec.kind is None and rec.status == "broken" and rec.name == name:
                raise PluginError(f"{kind} {name!r} is unavailable: plugin package {rec.package} {rec.version} "
                                  f"failed to load: {rec.error}")
        names = self.names(kind)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(names) or "none"
        broken = [f"{r.package} {r.version} ({r.error})" for r in self.records if r.kind is None and r.status == "broken"]
        tail = f"; plugins that failed to load: {'; '.join(broken)}" if broken else ""
        raise PluginError(f"unknown {kind} {name!r}{hint} (available: {known}){tail}")

    def names(self, kind: Kind) -> list[str]:
        """Names of the working plugins of ``kind``, sorted."""
        return sorted(name for (k, name), r in self._index.items() if k == kind and r.status == "ok")

    def list(self, pattern: str = "*", kind: Kind | None = None) -> list[PluginRecord]:
        """Records whose name matches the glob ``pattern`` (and ``kind`` if given), as ``fluency plugins`` shows them."""
        order = {k: i for i, k in enumerate(KINDS)}
        rows = [r for r in self.records if fnmatch.fnmatch(r.name, pattern) and (kind is None or r.kind == kind)]
        return sorted(rows, key=lambda r: (order.get(r.kind, len(order)) if r.kind else len(order), r.name, r.package))

    @staticmethod
    def option_defaults(kind: Kind, name: str) -> dict[str, Any]:
        """Defaults for a plugin's options from ``registry.toml`` (``[defaults.KIND.NAME]``)."""
        return dict(read_registry().get("defaults", {}).get(kind, {}).get(name, {}))


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide plugin manager (tests, or after installing a plugin)."""
    global _manager
    _manager = None


def plugin_version(manager: PluginManager, kind: str, name: str) -> str:
    """``package version`` of the plugin that provides ``kind`` ``name`` (``?`` if none does)."""
    for record in manager.records:
        if record.kind == kind and record.name == name:
            return f"{record.package} {record.version}"
    return "?"


def guarded(manager: PluginManager, kind: str, name: str, call: Callable[[], T]) -> T:
    """Run plugin code; an unexpected exception becomes one line naming the plugin, its package and version."""
    try:
        return call()
    except FluencyError:
        raise
    except Exception as exc:
        raise PluginFailure(f"{kind} {name!r} ({plugin_version(manager, kind, name)}) failed: {error_text(exc)}") \
            from exc
