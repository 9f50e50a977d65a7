"""``fluency plugins new``: write a ready plugin package that installs with pip and passes its own tests.

One template per plugin kind, each a small but real plugin (:data:`TEMPLATES` says what it computes),
in ``fluency/templates/plugin/<kind>/`` with the files every kind shares in ``common/``. Templates are
:class:`string.Template` text: ``$name``, ``$package``, ``$class_name`` … are replaced, ``$$`` is a
literal dollar sign. Nothing is written unless every check passes and every file renders.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from fluency.api import PLUGIN_API_VERSION
from fluency.core.errors import FluencyError
from fluency.core.plugin.specs import SPEC_TYPES
from fluency.core.version import __version__


@dataclass(frozen=True)
class KindTemplate:
    """The template of one kind: its one-line description (the spec's, shown by ``fluency plugins``), what its
    plugin module imports besides fluency, and what its tests import besides pytest and those."""

    description: str
    dependencies: tuple[str, ...]
    test_dependencies: tuple[str, ...] = ("numpy",)
    #: modules besides plugin.py (from ``<kind>/<module>.py.tmpl``): the torch code of a plugin whose
    #: classes subclass torch's, kept out of plugin.py so that listing the plugin does not import torch
    modules: tuple[str, ...] = ()


TEMPLATES: dict[str, KindTemplate] = {
    "metric": KindTemplate("Mean absolute activation of each image in each layer (lower: a more economical code).",
                           ("torch",)),
    "analysis": KindTemplate("Kendall tau of each metric and layer with the rating (two-sided p).",
                             ("numpy", "pandas", "scipy"), ()),
    "architecture": KindTemplate("A tiny convolutional VAE: two conv blocks, a Gaussian latent, two upsampling "
                                 "blocks.", ("torch",), modules=("model",)),
    "constraint": KindTemplate("L2 penalty on the activations of chosen layers (batch mean of the squared norm).",
                               ("torch",)),
    "optimizer": KindTemplate("SGD with Nesterov momentum (torch.optim.SGD).", ("torch",)),
}

#: the files of a package: path in the package (``$package`` replaced) → template, relative to templates/plugin
FILES: dict[str, str] = {
    "pyproject.toml": "common/pyproject.toml.tmpl",
    "README.md": "common/README.md.tmpl",
    ".gitignore": "common/gitignore.tmpl",
    "src/$package/__init__.py": "common/__init__.py.tmpl",
    "src/$package/plugin.py": "$kind/plugin.py.tmpl",
    "tests/test_plugin.py": "$kind/test_plugin.py.tmpl",
}
#: README sections each kind fills in: placeholder → template
README_PARTS = {"about": "$kind/about.md.tmpl", "usage": "$kind/usage.md.tmpl"}


@dataclass(frozen=True)
class NewPlugin:
    """A written package: its folder, distribution and import names, and the files written (relative paths)."""

    kind: str
    name: str
    directory: Path
    distribution: str
    package: str
    files: tuple[str, ...]

    def next_steps(self, shown: str | None = None) -> list[str]:
        """The commands that install, list and test the package (``shown``: the folder as the user wrote it)."""
        return [f"cd {shlex.quote(shown or str(self.directory))}",
                'pip install -e ".[test]"      # the plugin, editable, and pytest',
                f"fluency plugins {self.name}",
                "pytest"]


def package_names(name: str) -> tuple[str, str]:
    """``(distribution, import package)`` of the plugin ``name``: ``fluency-NAME``, ``fluency_NAME`` ('-' → '_')."""
    return f"fluency-{name}", f"fluency_{name.replace('-', '_')}"


def class_name(name: str) -> str:
    """The plugin class of ``name``: ``abs-mean`` → ``AbsMean``."""
    return "".join(part[:1].upper() + part[1:] for part in name.replace("_", "-").split("-") if part)


def check_new(kind: str, name: str, directory: Path) -> None:
    """Raise :class:`FluencyError` (one line) unless ``kind`` is a plugin kind, ``name`` a valid plugin name that
    no built-in plugin of that kind has, and ``directory`` missing or an empty folder."""
    if kind not in TEMPLATES:
        raise FluencyError(f"unknown plugin kind {kind!r}; choose one of {', '.join(TEMPLATES)}")
    try:
        SPEC_TYPES[kind](name=name, factory="module:attribute").check()  # the rule every spec's name follows
    except ValueError as exc:
        raise FluencyError(str(exc)) from None
    builtin = _builtin_names(kind)
    if name in builtin:
        raise FluencyError(f"{kind} {name!r} is a built-in fluency plugin; choose another name (built-in "
                           f"{kind}s: {', '.join(sorted(builtin))})")
    if directory.exists() and not directory.is_dir():
        raise FluencyError(f"{directory} exists and is not a folder; choose another --dir")
    if directory.is_dir() and any(directory.iterdir()):
        raise FluencyError(f"{directory} exists and is not empty; choose another --dir or remove it")


def _builtin_names(kind: str) -> set[str]:
    """Names of the built-in plugins of ``kind`` (fluency's own, whether or not they loaded)."""
    from fluency.core.plugin.manager import PluginManager

    manager = PluginManager(autoload=False, strict=False, blocked=())
    return {r.name for r in manager.records if r.kind == kind}


def render(kind: str, name: str) -> dict[str, str]:
    """The package's files for the plugin ``kind`` ``name``: relative path → text."""
    distribution, package = package_names(name)
    template = TEMPLATES[kind]
    values = {"kind": kind, "name": name, "distribution": distribution, "package": package,
              "class_name": class_name(name), "description": template.description,
              "fluency_version": __version__, "api_version": PLUGIN_API_VERSION,
              "dependencies": _toml_list((f"fluency>={__version__}", *template.dependencies)),
              "test_dependencies": _toml_list(("pytest>=8", *template.test_dependencies))}
    for key, source in README_PARTS.items():
        values[key] = _substitute(Template(source).substitute(kind=kind), values).rstrip("\n")
    files = {**FILES, **{f"src/$package/{m}.py": f"$kind/{m}.py.tmpl" for m in template.modules}}
    return {Template(target).substitute(package=package): _substitute(Template(source).substitute(kind=kind), values)
            for target, source in files.items()}


def _toml_list(items: tuple[str, ...]) -> str:
    """The items of a TOML array of strings (requirement specifiers: no quotes or backslashes to escape)."""
    return ", ".join(f'"{item}"' for item in items)


def _substitute(source: str, values: dict[str, str]) -> str:
    """The template file ``source`` (relative to templates/plugin) with ``values`` put in."""
    text = resources.files("fluency").joinpath("templates", "plugin", *source.split("/")).read_text(encoding="utf-8")
    return Template(text).substitute(values)


def new_plugin(kind: str, name: str, directory: str | Path | None = None) -> NewPlugin:
    """Write the package of a new plugin ``kind`` ``name`` into ``directory`` (default ``./fluency-NAME``).

    Refuses with a one-line :class:`FluencyError`, writing nothing, when the kind is unknown, the name is not a
    valid plugin name or is a built-in plugin's of that kind, or the folder exists and is not empty.
    """
    distribution, package = package_names(name)
    target = Path(directory) if directory is not None else Path(distribution)
    check_new(kind, name, target)
    files = render(kind, name)  # everything renders before anything is written
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return NewPlugin(kind, name, target, distribution, package, tuple(files))
