"""Every HOSLStrategy option is documented where users look: its __init__'s own docstring (IDEs, help(), and the
jsonargparse that ``hosl-lightning --help`` and LightningCLI configs read)."""

from __future__ import annotations

import inspect
import re

from jsonargparse import ArgumentParser

from hosl_lightning import HOSLStrategy


def _documented(doc: str) -> set[str]:
    names = set()
    for line in doc.splitlines():
        match = re.match(r"^ {4}([a-z_]+):", line)
        if match:
            names.add(match.group(1))
    return names


def test_init_documents_every_option() -> None:
    doc = inspect.getdoc(HOSLStrategy.__init__) or ""
    options = set(inspect.signature(HOSLStrategy.__init__).parameters) - {"self", "kwargs"}
    assert options - _documented(doc) == set()


def test_the_cli_help_shows_each_options_documentation() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(HOSLStrategy, "strategy")
    help_text = " ".join(parser.format_help().split())
    assert "number of random directions (queries) per step (unset: 1)" in help_text
    assert "one with ``fzoo``" in help_text  # q: not two forwards a query with fzoo
    assert "+mu for fzoo's one-sided one" in help_text  # mu: not only the two-point estimate
    assert "``\"gloo\"`` (what None, unset, stands for" in help_text  # backend's default is None, standing for gloo
