"""The catalog of the built-in plugins: their specs as registered, stored so that listing them needs no torch.

The built-in plugin modules import torch (models, tensors), whose import alone takes seconds, while
``fluency --help``, ``fluency plugins`` and a misspelt metric name should answer at once.
``fluency/plugins/catalog.json`` records, for each module of ``registry.toml``, the sha256 of its source
and what its registration hooks return: every spec's fields, its typed options, and its factory as a lazy
``"module:attribute"`` string, imported only when the plugin is used. The plugin manager builds a
module's specs from the catalog when the module's source still has the recorded hash and imports the
module otherwise, so an edited plugin is never described by stale metadata.

Regenerate the file after changing a built-in plugin: ``python -m fluency.core.plugin.catalog``
(tests/test_startup.py checks that it matches the plugins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from fluency.core.plugin.analysis import EffectSize
from fluency.core.plugin.options import Option
from fluency.core.plugin.specs import SPEC_TYPES, PluginSpec

CATALOG_PATH = Path(__file__).resolve().parents[2] / "plugins" / "catalog.json"
#: the dataclasses a spec's fields hold, rebuilt by name
_VALUE_TYPES: dict[str, type] = {"Option": Option, "EffectSize": EffectSize}


def source_digest(module: str) -> str | None:
    """sha256 of a module's source file, found without importing it (None if it has none)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin or not Path(found.origin).is_file():
        return None
    return hashlib.sha256(Path(found.origin).read_bytes()).hexdigest()


def factory_reference(spec: PluginSpec) -> str:
    """The spec's factory as ``"module:qualified.name"``; ``ValueError`` if it is not reachable by that name
    (a lambda or a nested function cannot be catalogued)."""
    if isinstance(spec.factory, str):
        return spec.factory
    ref = f"{spec.factory.__module__}:{spec.factory.__qualname__}"
    if dataclasses.replace(spec, factory=ref).load() is not spec.factory:
        raise ValueError(f"{spec.kind} {spec.name!r}: factory {ref} is not a module-level name")
    return ref


def _encode(value: Any) -> Any:
    """A spec field as JSON: dataclasses and tuples tagged so that :func:`_decode` rebuilds them exactly."""
    if dataclasses.is_dataclass(value) and type(value).__name__ in _VALUE_TYPES:
        return {"__type__": type(value).__name__,
                **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"cannot catalogue the value {value!r} ({type(value).__name__})")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    fields = {k: _decode(v) for k, v in value.items() if k != "__type__"}
    return _VALUE_TYPES[value["__type__"]](**fields) if "__type__" in value else fields


def spec_record(spec: PluginSpec) -> dict[str, Any]:
    """One spec as a JSON-ready record (the factory as a lazy reference)."""
    record: dict[str, Any] = {"kind": spec.kind}
    for f in dataclasses.fields(spec):
        record[f.name] = factory_reference(spec) if f.name == "factory" else _encode(getattr(spec, f.name))
    return record


def spec_from_record(record: Mapping[str, Any]) -> PluginSpec:
    """The spec a :func:`spec_record` describes."""
    return SPEC_TYPES[record["kind"]](**{k: _decode(v) for k, v in record.items() if k != "kind"})


@lru_cache(maxsize=1)
def read_catalog() -> dict[str, Any]:
    """The catalog's modules (empty when the file is missing or unreadable: every module is then imported)."""
    try:
        return dict(json.loads(CATALOG_PATH.read_text(encoding="utf-8"))["modules"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def catalogued_specs(module: str) -> list[PluginSpec] | None:
    """The specs of ``module`` from the catalog, or None when it has none or the module's source changed."""
    entry = read_catalog().get(module)
    if not entry or entry.get("sha256") != source_digest(module):
        return None
    try:
        return [spec_from_record(record) for record in entry["specs"]]
    except (KeyError, TypeError, ValueError):  # a hand-edited or older catalog: import the module instead
        return None


def build_catalog(modules: Iterable[str]) -> dict[str, Any]:
    """Import ``modules`` and record what their registration hooks return; any failure is an error."""
    from fluency.core.plugin.manager import PluginManager
    from fluency.core.version import __version__

    manager = PluginManager(load=False, autoload=False, strict=True, catalog=False)
    entries: dict[str, Any] = {}
    for module in modules:
        manager.import_plugin(module, "fluency", __version__)
        specs = [r.spec for r in manager.records if r.plugin == module and r.spec is not None]
        entries[module] = {"sha256": source_digest(module), "specs": [spec_record(s) for s in specs]}
    return {"about": "generated by `python -m fluency.core.plugin.catalog`: the built-in plugins' specs, "
                     "read by `fluency plugins` without importing them (see fluency/core/plugin/catalog.py)",
            "modules": entries}


def catalog_text(modules: Iterable[str]) -> str:
    """The catalog file's text for ``modules``."""
    return json.dumps(build_catalog(modules), indent=1) + "\n"


def main() -> None:
    """Write ``fluency/plugins/catalog.json`` for the modules of ``registry.toml``."""
    from fluency.core.plugin.manager import read_registry

    CATALOG_PATH.write_text(catalog_text(read_registry()["plugins"]["modules"]), encoding="utf-8")
    read_catalog.cache_clear()
    print(f"wrote {CATALOG_PATH}")


if __name__ == "__main__":
    main()
