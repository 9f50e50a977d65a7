"""The core's imports go one way: leaves → plugin → inputs | model → run | train → outputs → cli / API.

Every ``import`` in the package (also those inside functions) is read with ``ast`` and mapped to a
layer; a module may import its own layer's package or a lower layer, never a higher one or a sibling
(inputs and model do not import each other, nor do run and train). Built-in plugins do not import
each other. The last test breaks the rule in a scratch copy of the package and watches the check fail.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import fluency

PACKAGE = Path(fluency.__file__).parent
LEAVES = {"errors", "progress", "atomic", "stats", "version", "hashing", "noise_ceiling", "memory"}
#: sub-package of fluency.core -> rank; equal ranks are siblings that must not import each other
RANKS = {"leaf": 0, "plugin": 1, "inputs": 2, "model": 2, "run": 3, "train": 3, "outputs": 4, "top": 5}


PACKAGES = {"fluency", "fluency.core", "fluency.plugins",
            *(f"fluency.core.{name}" for name in ("plugin", "inputs", "model", "run", "train", "outputs"))}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name inside fluency (None outside the package)."""
    parts = module.split(".")
    if parts[0] != "fluency":
        return None
    if len(parts) == 1 or parts[1] in ("cli", "api", "testing"):
        return "top"
    if parts[1] == "plugins":
        return "plugins"
    if parts[1] != "core":
        return "top"
    if len(parts) == 2:
        return "top"  # `from fluency.core import x` is resolved per name by imported_modules
    return "leaf" if parts[2] in LEAVES else parts[2]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, importer: str, is_package: bool) -> list[str]:
    """Absolute names of what a module imports; relative imports are resolved against ``importer``."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = importer.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            if module in PACKAGES:  # `from fluency.plugins import default_gini`: the module named
                found += [f"{module}.{alias.name}" for alias in node.names]
            elif module:
                found.append(module)
    return found


def violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` that goes the wrong way, as 'importer -> imported (why)'."""
    bad: list[str] = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        src = layer_of(importer)
        if src is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target in imported_modules(tree, importer, path.name == "__init__.py"):
            dst = layer_of(target)
            if dst is None or target == importer:
                continue
            if src == "plugins":
                if dst == "plugins":
                    bad.append(f"{importer} -> {target} (a built-in plugin imports another plugin)")
                elif target.startswith("fluency.cli"):
                    bad.append(f"{importer} -> {target} (a plugin imports the command line)")
                continue
            if dst == "plugins":
                bad.append(f"{importer} -> {target} (the core imports a built-in plugin)")
                continue
            if src == "top":
                continue
            if src == "leaf" and dst != "leaf":
                bad.append(f"{importer} -> {target} (a leaf imports fluency)")
            elif RANKS[dst] > RANKS[src]:
                bad.append(f"{importer} -> {target} ({src} imports the higher layer {dst})")
            elif RANKS[dst] == RANKS[src] and dst != src:
                bad.append(f"{importer} -> {target} ({src} imports its sibling {dst})")
    return bad


def test_imports_go_one_way() -> None:
    assert violations(PACKAGE) == []


def test_core_is_organised_in_layers() -> None:
    core = PACKAGE / "core"
    loose = sorted(p.stem for p in core.glob("*.py") if p.stem != "__init__")
    assert set(loose) <= LEAVES, f"modules at the top of fluency/core that are not leaves: {set(loose) - LEAVES}"
    for package in ("plugin", "inputs", "model", "run", "train", "outputs"):
        assert (core / package / "__init__.py").exists()


@pytest.mark.parametrize("importer, line, why", [
    ("core/plugin/metric.py", "from fluency.core.run import pipeline", "plugin imports the higher layer run"),
    ("core/inputs/images.py", "from fluency.core.model import capture", "inputs imports its sibling model"),
    ("core/run/pipeline.py", "from fluency.core.outputs import figures", "run imports the higher layer outputs"),
    ("core/errors.py", "from fluency.core.plugin import options", "a leaf imports fluency"),
    ("core/run/store.py", "from ..outputs import figures", "run imports the higher layer outputs"),
    ("plugins/default_hoyer.py", "from fluency.plugins import default_gini", "a built-in plugin imports another"),
])
def test_the_check_catches_an_upward_import(tmp_path: Path, importer: str, line: str, why: str) -> None:
    scratch = tmp_path / "fluency"
    shutil.copytree(PACKAGE, scratch, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    target = scratch / importer
    target.write_text(target.read_text(encoding="utf-8") + f"\n\ndef _upward():\n    {line}\n", encoding="utf-8")
    found = violations(scratch)
    assert len(found) == 1 and why in found[0], found


PUBLIC = {"fluency", "fluency.api", "fluency.blocks"}


def test_built_in_plugins_use_only_the_public_api() -> None:
    """What a third-party package can import is all the built-ins import from fluency: ``fluency`` (its
    ``__all__``), ``fluency.api`` and ``fluency.blocks``."""
    private = []
    for path in sorted((PACKAGE / "plugins").glob("*.py")):
        importer = module_name(path, PACKAGE)
        for target in imported_modules(ast.parse(path.read_text(encoding="utf-8")), importer, False):
            parent, _, name = target.rpartition(".")
            public = target in PUBLIC or (parent == "fluency" and name in fluency.__all__)
            if target.split(".")[0] == "fluency" and not public:
                private.append(f"{importer} -> {target}")
    assert private == []


def test_the_public_modules_ship_typed_and_complete() -> None:
    import fluency.api
    import fluency.blocks
    import fluency.testing

    assert (PACKAGE / "py.typed").exists()
    for module in (fluency, fluency.api, fluency.blocks, fluency.testing):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], (module.__name__, missing)
    assert fluency.api.PLUGIN_API_VERSION == "1.2"


def test_every_public_name_is_documented() -> None:
    """Every class and function of the public modules, and their public methods, has a docstring (inherited
    docstrings count): the reference is generated from them."""
    import inspect

    import fluency.api
    import fluency.blocks
    import fluency.testing

    missing = []
    for module in (fluency, fluency.api, fluency.blocks, fluency.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
                missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(obj):
                missing += [f"{module.__name__}.{name}.{attr}" for attr, member in vars(obj).items()
                            if not attr.startswith("_") and inspect.isfunction(member)
                            and not inspect.getdoc(getattr(obj, attr))]
    assert missing == []
