"""Parameter-efficient HOSL: peft adapters (LoRA by default) on the client's blocks, the server's, or both.

The adapters are injected with peft into the blocks of each side before the cut, under the adapter names
``"client"`` and ``"server"``. A side with adapters trains only them (its base weights are frozen: never
perturbed by ZO, never given gradients); a side without keeps training all its weights. Zeroth-order
updates then perturb d_c = the client's adapter parameters, which HOSL's bound O(sqrt(d_c / (T Q))) favours.

Saving is peft's own format: ``save_adapters`` writes ``<dir>/client`` and ``<dir>/server`` (adapter_config.json
+ adapter_model.safetensors), which ``load_adapters`` (or ``PeftModel.from_pretrained``) reads back onto the
base model; ``merged_model`` gives a plain transformers model with the adapters merged, for inference.

Needs the ``peft`` extra: ``pip install 'hosl-lightning[peft]'``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from hosl_lightning.core.options import check_choice, check_int, check_number
from hosl_lightning.core.split import SUPPORTED_FAMILIES, num_blocks

SIDES = ("client", "server")
INSTALL_HINT = "pip install 'hosl-lightning[peft]'  (peft)"
AdapterSpec = Any  # a peft.PeftConfig, or a dict of LoraConfig fields (``peft_type`` picks another method)


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"adapters need peft: {INSTALL_HINT}") from error
    return peft


def adapter_config(spec: AdapterSpec, side: str) -> Any:
    """A peft config from a PeftConfig or a dict (LoraConfig fields by default; ``peft_type: IA3`` etc. for others).

    peft's own errors do not say which side's config they are about, so every refusal here names
    ``client_adapter`` or ``server_adapter``.
    """
    peft = _peft()
    if isinstance(spec, peft.PeftConfig):
        return _checked(copy.deepcopy(spec), side)
    if not isinstance(spec, Mapping):
        raise TypeError(f"{side}_adapter={spec!r} is not valid: give a peft config or a dict of its fields "
                        "(LoraConfig's by default), e.g. {'r': 8, 'target_modules': ['q_proj', 'v_proj']}")
    fields = dict(spec)
    kind = str(fields.pop("peft_type", "LORA")).upper()
    mapping = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    check_choice(f"{side}_adapter peft_type", kind, sorted(mapping))
    try:
        config = mapping[kind](**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{side}_adapter={dict(spec)!r} is not valid: {error}") from None
    return _checked(config, side)


def _checked(config: Any, side: str) -> Any:
    """Checks the fields peft takes unchecked, which fail (or go wrong) only once the adapters are injected."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear":  # peft matches a pattern against every block
        raise ValueError(f"{side}_adapter target_modules={targets!r} is not valid: give a list of module names "
                         "or 'all-linear' (a pattern would reach the other side's blocks too)")
    if hasattr(config, "r"):
        check_int(f"{side}_adapter r", config.r, 1)
    if hasattr(config, "lora_dropout"):
        check_number(f"{side}_adapter lora_dropout", config.lora_dropout, 0, 1)
    return config


def block_module_names(model: PreTrainedModel, blocks: range) -> list[str]:
    """Names (last component) of the modules in ``blocks`` that an adapter can wrap: Linear, Conv1D, Embedding."""
    family = SUPPORTED_FAMILIES[model.config.model_type]
    layers = model.get_submodule(f"{family.base}.{family.blocks}")
    names = set()
    for index in blocks:
        for name, module in layers[index].named_modules():
            if name and (isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"):
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _side_config(config: Any, model: PreTrainedModel, side: str, blocks: range) -> Any:
    family = SUPPORTED_FAMILIES[model.config.model_type]
    if len(blocks) == 0:
        raise ValueError(f"{side}_adapter: the {side} holds no decoder block at this cut_layer, so no adapter can go there")
    fitting = block_module_names(model, blocks)
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):
        unknown = sorted(set(targets) - set(fitting))
        if unknown:
            raise ValueError(
                f"{side}_adapter target_modules {unknown} match no module in the {side}'s blocks "
                f"[{blocks.start}, {blocks.stop}); module names that would fit: {fitting}"
            )
    config = copy.deepcopy(config)
    config.layers_to_transform = list(blocks)
    config.layers_pattern = family.blocks
    return config


def add_adapters(model: PreTrainedModel, cut_layer: int, client: AdapterSpec | None, server: AdapterSpec | None) -> Any:
    """Inject each side's adapters into ``model`` in place and return the PeftModel around it (for save and merge).

    Base weights of a side with adapters are frozen; a side without adapters keeps its requires_grad flags.
    """
    peft = _peft()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    head_flag = model.get_output_embeddings().weight.requires_grad
    n = num_blocks(model)
    ranges = {"client": range(cut_layer), "server": range(cut_layer, n)}
    configs = {side: _side_config(adapter_config(spec, side), model, side, ranges[side])
               for side, spec in (("client", client), ("server", server)) if spec is not None}
    if not configs:
        raise ValueError("add_adapters needs a client or a server adapter config")
    if len({c.peft_type for c in configs.values()}) > 1:
        raise ValueError(f"client and server adapters must be of one peft type, got "
                         f"{ {side: str(c.peft_type) for side, c in configs.items()} }")
    names = list(configs)
    wrapped = _inject(lambda: peft.get_peft_model(model, configs[names[0]], adapter_name=names[0]), names[0])
    for name in names[1:]:
        _inject(lambda name=name: wrapped.add_adapter(name, configs[name]), name)
    wrapped.base_model.set_adapter(names)  # both active: each block holds one side's adapter only
    # A head tied to the embeddings is one parameter with the client's embedding until the cut unties it; the
    # server's copy must then train as the server side says, not as the client's frozen embedding does.
    wrapped.hosl_head_requires_grad = head_flag and "server" not in configs
    for name, param in model.named_parameters():
        side = _side_of(name, model, cut_layer)
        if side in configs:
            param.requires_grad_(_is_adapter(name, side))
        elif name in flags:
            param.requires_grad_(flags[name])  # the side without adapters trains as it would without peft
    return wrapped


def _inject(call: Callable[[], Any], side: str) -> Any:
    """Runs one side's injection; a peft error then names the side whose config it is about."""
    try:
        return call()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{side}_adapter is not valid for this model: {error}") from error


def _is_adapter(name: str, side: str) -> bool:
    """peft names adapter weights by adapter name: ``...q_proj.lora_A.client.weight``."""
    return name.endswith(f".{side}") or f".{side}." in name


def _side_of(name: str, model: PreTrainedModel, cut_layer: int) -> str:
    """Which side owns a parameter of the unsplit model (blocks by index; before the blocks: client)."""
    family = SUPPORTED_FAMILIES[model.config.model_type]
    marker = f"{family.base}.{family.blocks}."
    if name.startswith(marker):
        return "client" if int(name[len(marker):].split(".", 1)[0]) < cut_layer else "server"
    embeddings = tuple(f"{family.base}.{e}." for e in family.embeddings)
    return "client" if name.startswith(embeddings) else "server"


def untied_head_trainable(peft_model: Any, server_head: nn.Module) -> None:
    """After the cut: give the server's head (a clone, if it was tied) the trainability of the server's side."""
    server_head.weight.requires_grad_(bool(getattr(peft_model, "hosl_head_requires_grad", False)))


def save_adapters(peft_model: Any, directory: str | Path) -> list[Path]:
    """Write each side's adapter in peft's format: ``<directory>/client``, ``<directory>/server``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sides = [side for side in SIDES if side in peft_model.peft_config]
    peft_model.save_pretrained(str(out), selected_adapters=sides)
    return [out / side for side in sides]


def load_adapters(model: PreTrainedModel, directory: str | Path) -> Any:
    """A PeftModel over ``model`` with the adapters ``save_adapters`` wrote, both active (peft's from_pretrained)."""
    peft = _peft()
    root = Path(directory)
    sides = [side for side in SIDES if (root / side / "adapter_config.json").exists()]
    if not sides:
        raise FileNotFoundError(f"no adapter in {str(root)!r}: expected {root / 'client'} and/or {root / 'server'}")
    wrapped = peft.PeftModel.from_pretrained(model, str(root / sides[0]), adapter_name=sides[0])
    for side in sides[1:]:
        wrapped.load_adapter(str(root / side), adapter_name=side)
    wrapped.base_model.set_adapter(sides)
    return wrapped


def merged_model(peft_model: Any, server_head: nn.Module | None = None) -> PreTrainedModel:
    """A plain transformers model with the adapters merged into a copy of the weights (training is untouched).

    ``server_head``: the split model's server head, which the cut untied from a tied embedding; the merged model
    takes it as its own (untied) head, so it computes exactly what the trained split model does.
    """
    merged = copy.deepcopy(peft_model).merge_and_unload()
    if server_head is not None:
        head = merged.get_output_embeddings()
        head.weight = nn.Parameter(server_head.weight.detach().clone())
        merged.config.tie_word_embeddings = False
        if hasattr(merged.config, "get_text_config"):
            merged.config.get_text_config().tie_word_embeddings = False
    return merged
