"""Loading one half only: a client or server process of a multi-process run needs nothing of the other half.

The model is first built on the meta device (its structure, no memory) and remembers where its weights are;
once the cut is known, :func:`materialize_half` allocates and reads only one half's tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from hosl_lightning.models.configs import check_model_type
from hosl_lightning.models.sources import DTYPES, check_model_directory, resolve_source


@dataclass(frozen=True)
class ModelSource:
    """Where a model built on the meta device gets its weights from, once it is known which half is needed."""

    model: str | None
    model_config: dict[str, Any] | None
    dtype: str
    gguf_file: str | None


_DEFERRED = [False]


@contextmanager
def deferred_weights() -> Iterator[None]:
    """Models loaded inside this context are built on the meta device (structure, no memory) and remember their
    source; the strategy of a multi-process run then materialises only its own half (:func:`materialize_half`).
    """
    previous, _DEFERRED[0] = _DEFERRED[0], True
    try:
        yield
    finally:
        _DEFERRED[0] = previous


def weights_deferred() -> bool:
    """Whether a :func:`deferred_weights` context is open, so models are to be built on the meta device."""
    return _DEFERRED[0]


def export_model(model: PreTrainedModel, directory: str | Path) -> Path:
    """Save ``model`` as ``config.json`` + ``model.safetensors`` (what a multi-process run loads half by half).

    Unlike ``save_pretrained`` this also works for a model dequantized from GGUF, which transformers refuses
    to serialise: the weights are plain tensors by then, so they are written as they are.
    """
    from safetensors.torch import save_model

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF file's; the saved tensors are not quantized
    config.save_pretrained(path)
    save_model(model, str(path / "model.safetensors"))
    return path


def _config_of(source: ModelSource) -> Any:
    if source.model_config is not None:
        config = dict(source.model_config)
        return AutoConfig.for_model(config.pop("model_type"), **config)
    assert source.model is not None
    path, gguf = resolve_source(source.model, source.gguf_file)
    if gguf:
        raise ValueError(
            f"model={source.model!r} is a GGUF file, which transformers can only load whole; a multi-process run "
            "loads each half alone, so convert it once into a directory and pass that instead: "
            "python -c \"from hosl_lightning.models import export_model, load_causal_lm; "
            f"export_model(load_causal_lm({source.model!r}), 'model-dir')\""
        )
    check_model_directory(path, None)
    config = AutoConfig.from_pretrained(path)
    check_model_type(config.model_type, f"of model={source.model!r}")
    return config


def meta_causal_lm(source: ModelSource) -> PreTrainedModel:
    """The model's structure on the meta device, holding no weights, tagged with its source."""
    config = _config_of(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[source.dtype])
    model._hosl_source = source  # type: ignore[attr-defined]
    return model


def _checkpoint_files(source: ModelSource) -> list[Path]:
    """The safetensors (or PyTorch .bin) files holding ``source``'s weights; a hub id is downloaded first."""
    assert source.model is not None
    path = Path(source.model).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(source.model, allow_patterns=["*.safetensors", "*.json", "*.bin"]))
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"model={source.model!r}: no *.safetensors or *.bin weight files in {path}")
    return files


def _read_tensors(files: list[Path], wanted: dict[str, list[str]]) -> dict[str, Tensor]:
    """For each wanted name, the first of its candidate keys found in the files; only those tensors are read."""
    found: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                keys = set(handle.keys())
                for name, candidates in wanted.items():
                    key = next((k for k in candidates if k in keys), None)
                    if name not in found and key is not None:
                        found[name] = handle.get_tensor(key)
        else:  # memory-mapped: pages of the other half's tensors are never read
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for name, candidates in wanted.items():
                key = next((k for k in candidates if k in state), None)
                if name not in found and key is not None:
                    found[name] = state[key]
    return found


def materialize_half(model: PreTrainedModel, half: nn.Module, device: torch.device | str = "cpu") -> None:
    """Give one half of a meta-device ``model`` (see :func:`meta_causal_lm`) real storage and its weights.

    Only the half's own tensors are allocated and read from the checkpoint files; the other half stays on the
    meta device and costs nothing. Modules are first initialised the model's own way (which also computes
    buffers such as rotary frequencies); a model from ``model_config`` keeps that random initialisation.
    """
    source: ModelSource = model._hosl_source  # type: ignore[attr-defined]
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    head_name, embedding_name = module_names[id(head)], module_names[id(embeddings)]
    tied = head.weight is embeddings.weight
    wanted: dict[str, list[str]] = {}
    owners: dict[str, tuple[nn.Module, str]] = {}
    for module in half.modules():
        prefix = module_names.get(id(module))
        if prefix is None and isinstance(module, nn.Linear) and module.out_features == head.out_features:
            prefix = head_name  # the server's untied copy of a tied LM head
        if prefix is None:
            continue
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or (name in module._buffers and name in module._non_persistent_buffers_set):
                continue
            key = f"{prefix}.{name}" if prefix else name
            candidates = [key]
            if tied and name == "weight" and prefix in (head_name, embedding_name):
                # tied weights are stored once, under either name
                candidates.append(f"{embedding_name if prefix == head_name else head_name}.weight")
            base = model.base_model_prefix  # checkpoints of the bare base model (e.g. stock GPT-2) lack it
            candidates += [c[len(base) + 1:] for c in candidates if base and c.startswith(base + ".")]
            wanted[key], owners[key] = candidates, (module, name)
    half.to_empty(device=device)
    with torch.no_grad():
        for module in half.modules():
            model._init_weights(module)
        if source.model is None:
            return
        found = _read_tensors(_checkpoint_files(source), wanted)
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise KeyError(f"model={source.model!r}: the weight files lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for key, tensor in found.items():
            module, name = owners[key]
            target = getattr(module, name)
            if target.shape != tensor.shape:
                raise ValueError(f"{key}: the weight file holds shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(tensor)
