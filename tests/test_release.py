"""Release hygiene: one version, a wheel that carries its assets and its py.typed marker, and a compatibility floor
that .ci/run tests with exactly the versions pyproject.toml allows."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import hosl_lightning

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floors() -> dict[str, str]:
    """Each declared dependency's lower bound (``>=``), by normalised name."""
    floors = {}
    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                floors[_name(requirement.name)] = spec.version
    return floors


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
            pins[_name(requirement.name)] = spec.version
    return pins


def _same_version(a: str, b: str) -> bool:
    """2.6 and 2.6.0 are one version."""
    def parts(v: str) -> list[str]:
        out = v.split(".")
        while out and out[-1] == "0":
            out.pop()
        return out
    return parts(a) == parts(b)


def test_the_version_has_one_source() -> None:
    assert hosl_lightning.__version__ == "0.2.0"
    assert "version" not in PYPROJECT["project"], "pyproject.toml must read the version from the package"
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hosl_lightning.__version__"}


def test_the_oldest_environment_pins_every_floor_of_pyproject() -> None:
    floors = _floors()
    pins = _pins(ROOT / ".ci" / "oldest-requirements.txt")
    torch_floor = floors.pop("torch")  # installed first, on its own line in .ci/run, so that pip takes the CPU build
    oldest_torch = re.search(r"\.venv-oldest/bin/pip install torch==(\S+)", (ROOT / ".ci" / "run").read_text())
    assert oldest_torch and _same_version(oldest_torch.group(1), torch_floor), (torch_floor, oldest_torch)
    missing = sorted(set(floors) - set(pins))
    assert not missing, f".ci/oldest-requirements.txt pins no version of {missing}"
    differ = {name: (floors[name], pins[name]) for name in floors if not _same_version(floors[name], pins[name])}
    assert not differ, f"floor in pyproject.toml vs pin in .ci/oldest-requirements.txt: {differ}"


def test_the_smoke_list_names_existing_tests() -> None:
    entries = [line for line in (ROOT / "tests" / "smoke.txt").read_text().splitlines() if line.strip()]
    assert entries
    for entry in entries:
        path, name = entry.split("::")[:2]
        source = (ROOT / path).read_text()
        assert f"def {name.split('[')[0]}(" in source, f"tests/smoke.txt: {entry} names no test"


def test_the_changelog_keeps_unreleased_above_the_released_versions() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, flags=re.MULTILINE)
    assert headings[0] == ("Unreleased", "")
    released = [version for version, date in headings[1:]]
    assert "0.1.0" in released and all(date for _, date in headings[1:]), headings
    for version, _ in headings:
        assert re.search(rf"^\[{re.escape(version)}\]: ", text, flags=re.MULTILINE), f"CHANGELOG.md: no link for [{version}]"


def test_the_wheel_carries_the_assets_and_the_typed_marker(tmp_path: Path) -> None:
    """Builds without isolation (the environment's setuptools), so it needs no network and takes seconds."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("hosl_lightning-*.whl")
    assert wheel.name.startswith(f"hosl_lightning-{hosl_lightning.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "hosl_lightning" / "assets").rglob("*")
              if p.is_file()}
    assert assets and assets <= names, sorted(assets - names)
    assert "hosl_lightning/py.typed" in names
