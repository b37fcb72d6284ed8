"""Models the studies build: SmolLM2-135M's shape with random weights (cost and memory do not depend on weight
values), pretrained SmolLM2 cut down to its first blocks, and batches of random tokens."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.core.split import num_blocks
from hosl_lightning.lightning.cut import freeze_client_modules

SMOLLM2 = "smollm2-135m"
SMOLLM2_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "tie_word_embeddings": True, "max_position_embeddings": 2048}


def smollm2_shaped(layers: int = SMOLLM2_SHAPE["num_hidden_layers"]) -> Any:
    """A causal LM of SmolLM2-135M's shape with ``layers`` blocks and seeded random weights."""
    torch.manual_seed(0)
    return load_causal_lm(model_config=dict(SMOLLM2_SHAPE, num_hidden_layers=layers))


def _block_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder-block ``ModuleList`` of ``model``, and its attribute name."""
    n = num_blocks(model)
    for owner in model.modules():
        for name, child in owner.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return owner, name
    raise LookupError(f"no list of {n} decoder blocks in {type(model).__name__}")


def keep_blocks(model: Any, layers: int) -> Any:
    """``model`` cut down, in place, to its first ``layers`` decoder blocks (final norm and head kept)."""
    owner, name = _block_list(model)
    setattr(owner, name, nn.ModuleList(list(getattr(owner, name))[:layers]))
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def first_blocks_copy(model: Any, layers: int) -> Any:
    """A deep copy of ``model`` with its first ``layers`` blocks only, without copying the others."""
    owner, name = _block_list(model)
    blocks = getattr(owner, name)
    setattr(owner, name, nn.ModuleList(list(blocks)[:layers]))
    try:
        trimmed = copy.deepcopy(model)
    finally:
        setattr(owner, name, blocks)
    trimmed.config.num_hidden_layers = layers
    if getattr(trimmed.config, "layer_types", None) is not None:
        trimmed.config.layer_types = trimmed.config.layer_types[:layers]
    return trimmed


def prepare_model(layers: int, directory: Path) -> Path:
    """SmolLM2-135M-Instruct's first ``layers`` blocks, with its tokenizer, as a directory (made once)."""
    if (directory / "model.safetensors").exists():
        return directory
    from hosl_lightning import resolve_tokenizer
    from hosl_lightning.models import export_model

    export_model(keep_blocks(load_causal_lm(SMOLLM2), layers), directory)
    resolve_tokenizer(SMOLLM2).save_pretrained(directory)
    return directory


def exported(directory: Path, model: Any | None = None) -> Path:
    """SmolLM2-135M-Instruct (or ``model``, already loaded) as ``config.json`` + ``model.safetensors`` in
    ``directory``, made once: what each process of a two-process run loads its half from."""
    if not (directory / "model.safetensors").exists():
        from hosl_lightning.models import export_model

        export_model(load_causal_lm(SMOLLM2) if model is None else model, directory)
    return directory


def random_batch(vocab: int, batch: int, length: int, labels: str = "last",
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random token ids without padding. ``labels``: "last" labels each row's last position only, as a prompt's
    label word (labels live on the server: the client's cost does not depend on them); "all" labels every one."""
    ids = torch.randint(0, vocab, (batch, length), generator=generator or torch.Generator().manual_seed(0))
    if labels == "all":
        target = ids.clone()
    else:
        target = torch.full_like(ids, -100)
        target[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": target}


def client_weights(base: Any, cut: int, adapter: dict[str, Any] | None, frozen: tuple[str, ...] | None = None) -> int:
    """d_c: the weights the client perturbs, counted on the cut model (less ``frozen``); with LoRA, the adapters'
    A and B alone (r x (in + out) per adapted linear layer)."""
    if adapter is None:
        split = SplitCausalLM(copy.deepcopy(base), cut)
        freeze_client_modules(split.client, list(frozen or ()))
        return sum(p.numel() for p in split.client.parameters() if p.requires_grad)
    total = 0
    for layer in base.model.layers[:cut]:
        for name in adapter["target_modules"]:
            linear = getattr(layer.self_attn, name)
            total += adapter["r"] * (linear.in_features + linear.out_features)
    return total
