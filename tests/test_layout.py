"""The package's layout keeps its promises: no import cycle (lazy imports included), no private name imported
across subpackages, no module past the size a reader takes in at one sitting, and each mode written once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "hosl_lightning"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import in the file, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("hosl_lightning")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hosl_lightning"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in modules else (node.module, alias.name))
    return found


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_no_import_cycle_lazy_imports_included() -> None:
    modules = _modules()
    graph = {m: {target for target, _ in _imports(p, modules) if target in modules and target != m} for m, p in modules.items()}
    # The package's own __init__ is imported by every submodule's import; its lazy table is no edge.
    graph["hosl_lightning"] = {t for t in graph["hosl_lightning"] if t == "hosl_lightning.lightning.strategy"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_private_name_is_imported_across_subpackages() -> None:
    modules = _modules()
    crossings = [
        (importer, f"{target}.{name}")
        for importer, path in modules.items()
        for target, name in _imports(path, modules)
        if name is not None and name.startswith("_") and _subpackage(target) != _subpackage(importer)
    ]
    assert not crossings, crossings


def test_every_module_fits_one_sitting() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_each_mode_has_one_client_half_and_one_server_half() -> None:
    """Every path runs the registered halves: no other module defines a mode's step."""
    defining = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if {"client_step", "server_step"} & names:
            defining[module] = sorted(names & {"client_step", "server_step"})
    from hosl_lightning.modes import MODES

    assert set(MODES) == {"hosl", "fo", "zo", "frozen"}  # a new built-in mode is added here on purpose
    assert defining == {f"hosl_lightning.modes.{m}": ["client_step", "server_step"] for m in MODES}


@pytest.mark.parametrize("heavy", ["datasets", "pandas", "pyarrow", "optuna", "peft"])
def test_a_client_process_imports_no_data_or_tuning_tooling(heavy: str) -> None:
    """What an edge client imports (the strategy, the module, the split model) must not pull these in."""
    code = ("import sys, hosl_lightning; from hosl_lightning import HOSLModule, SplitCausalLM, load_causal_lm; "
            f"print({heavy!r} in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
