"""Directives that generate the reference pages from the code itself, so they cannot drift from it.

- ``hosl-api``: autodoc for every name in ``hosl_lightning.__all__``;
- ``hosl-registry NAME``: the entries of a registry (modes, client optimizers, tasks, model families, aliases);
- ``hosl-cli-help SUBCOMMAND``: what ``hosl-lightning SUBCOMMAND --help`` prints, run at build time.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import hosl_lightning

REGISTRIES = {  # directive argument -> (module, attribute, what an entry is)
    "modes": ("hosl_lightning.modes", "MODES", "HOSLStrategy(mode=...)"),
    "zo_optimizers": ("hosl_lightning.zo_optimizers", "ZO_OPTIMIZERS", "HOSLStrategy(zo_optimizer=...)"),
    "tasks": ("hosl_lightning.data", "TASKS", "PromptClassificationDataModule(task=...)"),
    "families": ("hosl_lightning.core.split", "SUPPORTED_FAMILIES", "the config's model_type"),
    "model_aliases": ("hosl_lightning.models.sources", "MODEL_ALIASES", "HOSLModule(model=...)"),
}


class _Generated(SphinxDirective):
    def _parse(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<{self.name}>"), self.content_offset, container)
        return container.children


class ApiDirective(_Generated):
    """autoclass / autofunction / autodata for each public name, in ``__all__``'s order."""

    def run(self) -> list[nodes.Node]:
        lines: list[str] = []
        for name in hosl_lightning.__all__:
            value = getattr(hosl_lightning, name)
            if inspect.isclass(value):
                lines += [f".. autoclass:: hosl_lightning.{name}", ""]
            elif callable(value):
                lines += [f".. autofunction:: hosl_lightning.{name}", ""]
            else:
                home = _home(name)
                lines += [f".. py:data:: hosl_lightning.{name}", "",
                          f"   Defined in ``{home}``: {type(value).__name__} of {len(value)} entries; see",
                          "   :doc:`registries`.", ""]
        return self._parse(["```{eval-rst}", *lines, "```"])  # a MyST page parses nested text as markdown


def _home(name: str) -> str:
    for module in ("hosl_lightning.data.tasks", "hosl_lightning.data"):
        if hasattr(import_module(module), name):
            return module
    return "hosl_lightning"


class RegistryDirective(_Generated):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        which = self.arguments[0]
        if which not in REGISTRIES:
            raise self.error(f"hosl-registry {which!r}: choose one of {sorted(REGISTRIES)}")
        module, attribute, selects = REGISTRIES[which]
        registry: dict[str, Any] = getattr(import_module(module), attribute)
        lines = [f"``{module}.{attribute}``: each name below is what {selects} takes.", ""]
        for key, entry in registry.items():
            lines.append(f"- ``{key}``: {_summary(entry)}")
        return self._parse([*lines, ""])


def _summary(entry: Any) -> str:
    """A class's first docstring paragraph; a dataclass instance's plain fields (no callables)."""
    if inspect.isclass(entry):
        doc = (inspect.getdoc(entry) or "").split("\n\n")[0].replace("\n", " ")
        return f"``{entry.__module__}.{entry.__qualname__}``" + (f": {doc}" if doc else "")
    fields = getattr(entry, "__dataclass_fields__", {})
    package = str(Path(hosl_lightning.__file__).parent)  # a bundled file's path, shown from the package, not this machine
    shown = [f"{name}={getattr(entry, name)!r}".replace(package, "<hosl_lightning>") for name in fields
             if isinstance(getattr(entry, name), str | int | float | bool | tuple | dict)
             and not callable(getattr(entry, name)) and name != "name"]
    return f"{type(entry).__name__}(" + ", ".join(f"``{item}``" for item in shown) + ")"


class CliHelpDirective(SphinxDirective):
    """The help text of one subcommand, run now: the page shows what the installed command prints."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        command = [sys.executable, "-m", "hosl_lightning.cli", self.arguments[0], "--help"]
        env = {**os.environ, "COLUMNS": "110"}
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
        if done.returncode != 0:
            raise self.error(f"`hosl-lightning {self.arguments[0]} --help` exited {done.returncode}: {done.stderr}")
        block = nodes.literal_block(done.stdout, done.stdout)
        block["language"] = "text"
        return [block]


_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+\.md)\)")


def link_repository_files(app: Sphinx, docname: str, source: list[str]) -> None:
    """A link to a markdown file of the repository outside docs/ (a results table, benchmarks/README.md) becomes
    a download of that file, as links to other files already are; on GitHub the plain link works as written."""
    folder = (Path(app.srcdir) / docname).parent
    srcdir = Path(app.srcdir).resolve()

    def replace(match: re.Match[str]) -> str:
        target = (folder / match.group(2)).resolve()
        if srcdir in target.parents or not target.is_file():
            return match.group(0)  # a page of the site, or a broken link that the build should report
        return f"{{download}}`{match.group(1)} <{match.group(2)}>`"

    source[0] = _LINK.sub(replace, source[0])


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", link_repository_files)
    app.add_directive("hosl-api", ApiDirective)
    app.add_directive("hosl-registry", RegistryDirective)
    app.add_directive("hosl-cli-help", CliHelpDirective)
    return {"parallel_read_safe": True, "version": hosl_lightning.__version__}
