"""Sphinx configuration of the hosl-lightning docs.

Built by ``.ci/run`` with warnings as errors: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Intersphinx (links into the torch, Lightning and transformers docs) needs their inventories from the network,
which CI does not have: set ``HOSL_DOCS_INTERSPHINX=1`` to turn it on where the network is there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import hosl_lightning

project = "hosl-lightning"
release = version = hosl_lightning.__version__
copyright = "the hosl-lightning authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
    "sphinx.ext.intersphinx",
    "hosl_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "README.md"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

html_theme = "furo"
html_title = f"hosl-lightning {version}"

autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # Lightning's own docstrings use roles and labels of its docs
autodoc_default_options = {"members": True, "show-inheritance": True}
typehints_fully_qualified = False
always_document_param_types = False

intersphinx_mapping = {}
if os.environ.get("HOSL_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
        "lightning": ("https://lightning.ai/docs/pytorch/stable", None),
        "transformers": ("https://huggingface.co/docs/transformers/main/en", None),
    }
