"""The cut as the strategy makes it: find the causal LM inside a module, split it, put the split model in its
place, and mark the parameters that learn by zeroth-order updates (so backprop never gives them a gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule
from torch import nn

from hosl_lightning.core.options import UserError
from hosl_lightning.core.split import split_causal_lm
from hosl_lightning.core.split_model import SplitCausalLM, find_causal_lm
from hosl_lightning.distributed.client import ClientSplitCausalLM
from hosl_lightning.models import add_adapters, materialize_half, untied_head_trainable


def install_split(module: LightningModule, name: str, split: SplitCausalLM) -> None:
    """Put ``split`` where the module kept its model (attribute ``name``), so the module's own code calls it."""
    if not name:
        raise ValueError("HOSLStrategy needs the causal LM as an attribute of a LightningModule, not the module itself")
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attribute, split)


def mark_zeroth_order(split: SplitCausalLM, zo_halves: tuple[str, ...]) -> None:
    """Freeze the halves that learn by ZO against backprop, and tag their trainable tensors for the ZO optimizer."""
    for half in [getattr(split, side) for side in zo_halves]:
        for param in half.parameters() if half is not None else ():
            if param.requires_grad:
                param.requires_grad_(False)
                param._hosl_zo = True  # type: ignore[attr-defined]  # trained by ZO, never by backprop


def freeze_halves(split: SplitCausalLM, halves: tuple[str, ...]) -> None:
    """Take whole halves out of training (a mode whose client never learns): no gradient, no optimizer state."""
    for half in [getattr(split, side) for side in halves]:
        if half is not None:
            half.requires_grad_(False)


def freeze_client_modules(client: nn.Module | None, names: list[str]) -> None:
    """Take the named modules of the client half out of training (before the ZO parameters are tagged).

    A distributed run's server does the same to its unused copy of the client half, so that both count the
    client's ZO tensors alike (the server's keys continue after them)."""
    if client is None:
        return
    known = [name for name, _ in client.named_modules() if name and name.count(".") < 3]
    for name in names:
        try:
            frozen = client.get_submodule(name)
        except AttributeError:
            raise UserError(f"client_frozen names {name!r}, which the client half does not have; its modules: "
                             f"{known}") from None
        frozen.requires_grad_(False)


def cut_module(
    module: LightningModule, cut_layer: int, role: str, zo_halves: tuple[str, ...],
    client_split: Callable[[nn.Module], SplitCausalLM], adapters: tuple[Any, Any] = (None, None),
    client_frozen: list[str] | None = None, frozen_halves: tuple[str, ...] = (),
) -> tuple[SplitCausalLM, Any, bool]:
    """Cut the module's model (once): returns (split model, the PeftModel if adapters were added, newly cut).

    ``client_split`` builds a client process's split model (its half only); in-process both halves stay here.
    ``client_frozen``: modules of the client half that do not train (``freeze_client_modules``); ``frozen_halves``:
    whole halves that do not (the mode's).
    """
    name, model = find_causal_lm(module)
    if isinstance(model, SplitCausalLM):
        return model, None, False  # already cut (a second fit/validate on the same module)
    if role == "server":
        raise RuntimeError("the server process of a distributed run does not run a Trainer: call strategy.serve(module)")
    if any(p.is_meta for p in model.parameters()) and role == "both":
        raise ValueError(
            "the model was built on the meta device (hosl_lightning.models.deferred_weights) for a distributed "
            "run, but this strategy has transport='in_process': build it without deferred_weights"
        )
    client_adapter, server_adapter = adapters
    peft_model = None
    if client_adapter is not None or server_adapter is not None:
        peft_model = add_adapters(model, cut_layer, client_adapter, server_adapter)
    split = client_split(model) if role == "client" else SplitCausalLM(model, cut_layer)
    if peft_model is not None:
        untied_head_trainable(peft_model, split.server.lm_head)
    install_split(module, name, split)
    freeze_client_modules(split.client, client_frozen or [])
    freeze_halves(split, frozen_halves)
    mark_zeroth_order(split, zo_halves)
    return split, peft_model, True


def client_process_split(model: nn.Module, cut_layer: int, device: Any) -> ClientSplitCausalLM:
    """A client process's split model: its half only (materialised from the source if built on meta)."""
    client, _ = split_causal_lm(model, cut_layer)  # type: ignore[arg-type]
    if any(p.is_meta for p in client.parameters()):
        materialize_half(model, client, device)  # type: ignore[arg-type]
    return ClientSplitCausalLM.from_halves(client, None, model.config, cut_layer)
