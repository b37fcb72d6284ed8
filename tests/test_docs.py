"""The docs cannot rot: every code block in docs/ and README.md runs here or says why it does not, configs shown
in YAML build the strategy they describe, and every internal link points at a file (and heading) that exists.

Code blocks by language:
- ``python``: run, each in a fresh namespace, in a temporary directory;
- ``bash``: run with ``bash -e`` in a temporary copy of ``configs/``, ``hosl-lightning`` being this interpreter's;
- ``yaml``: parsed; a strategy's ``init_args`` build a ``HOSLStrategy`` (the options are checked as in a run);
- ``text``: output shown, nothing to run.
A block preceded by ``<!-- not run: <reason> -->`` is skipped. A block with no language fails the test.
The Sphinx build itself (warnings as errors) runs in ``.ci/run``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts) + [ROOT / "README.md"]
NOT_RUN = re.compile(r"^<!-- not run: (\S.*\S) -->$")
LANGUAGES = {"python", "bash", "yaml", "text"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info = lines[i][3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if not info.startswith("{"):  # a MyST directive (toctree, the reference generators) is not a code block
                marker = NOT_RUN.match(lines[i - 1]) if i else None
                blocks.append(Block(page, i + 1, info, "\n".join(lines[i + 1:end]) + "\n",
                                    marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in _blocks(page)]


def _of(language: str) -> list:
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.language == language and b.not_run is None]


def test_every_block_has_a_known_language() -> None:
    unknown = [f"{b.id} ({b.language or 'none'})" for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"fenced blocks need one of {sorted(LANGUAGES)}: {unknown}"


def test_the_docs_have_runnable_blocks_of_each_kind() -> None:
    """Guards the extraction itself: a parser that found nothing would pass every test below."""
    assert _of("python") and _of("bash") and _of("yaml")


@pytest.mark.parametrize("block", _of("python"))
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, block.id, "exec"), {"__name__": "__docs__"})  # noqa: S102 - running the docs is the test


@pytest.mark.parametrize("block", _of("bash"))
def test_bash_block_runs(block: Block, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "hosl-lightning"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hosl_lightning.cli "$@"\n')
    launcher.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e", "-c", block.code], cwd=tmp_path, env=env, check=False, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{block.id} exited {done.returncode}:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("block", _of("yaml"))
def test_yaml_block_parses_and_its_strategy_options_are_valid(block: Block) -> None:
    from hosl_lightning import HOSLStrategy

    config = yaml.safe_load(block.code)
    strategy = config.get("trainer", config).get("strategy") if isinstance(config, dict) else None
    if isinstance(strategy, dict) and strategy.get("class_path", "").endswith("HOSLStrategy"):
        HOSLStrategy(**strategy.get("init_args", {}))


def test_a_block_marked_not_run_says_why() -> None:
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.startswith("<!-- not run"):
                assert NOT_RUN.match(line), f"{page.relative_to(ROOT)}:{number}: write <!-- not run: <reason> -->"
                assert number < len(lines) and lines[number].startswith("```"), (
                    f"{page.relative_to(ROOT)}:{number}: the marker must stand right above a code block")


def _slug(heading: str) -> str:
    """MyST's (GitHub's) anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"^#{1,6} (.*)$", line)):
            anchors.add(_slug(match.group(1)))
    return anchors


def test_internal_links_point_at_files_and_headings_that_exist() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
