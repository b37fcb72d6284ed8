"""The server process's setup: load only the server half, build its optimizer, and answer the clients.

Run by :class:`~hosl_lightning.lightning.launcher.ServerLauncher` when ``trainer.fit`` (or validate, test) is
called on rank 0 of a distributed run: the same script or config then serves every process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim import Optimizer

from hosl_lightning.core.split import split_causal_lm
from hosl_lightning.core.split_model import SplitCausalLM, find_causal_lm
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.distributed.peers import Peers
from hosl_lightning.distributed.server import SplitServer
from hosl_lightning.lightning.cut import freeze_client_modules
from hosl_lightning.models import materialize_half
from hosl_lightning.modes import ZOSettings, get_mode


def zo_parameter_count(client: nn.Module, mode: str) -> int:
    """How many of the client's tensors take ZO directions: the server's keys continue after them (zo mode)."""
    if not get_mode(mode).zo_halves:
        return 0
    return sum(1 for p in client.parameters() if p.requires_grad or getattr(p, "_hosl_zo", False))


def load_server_half(module: LightningModule, cut_layer: int, device: torch.device,
                     client_frozen: list[str] | None = None) -> tuple[str, SplitCausalLM, int]:
    """The module's model cut, with only the server half materialised on ``device``; (attribute name, split,
    the client's ZO tensor count, less the modules in ``client_frozen``, as the client counts them)."""
    name, model = find_causal_lm(module)
    client, server = split_causal_lm(model, cut_layer)  # type: ignore[arg-type]
    freeze_client_modules(client, client_frozen or [])
    if any(p.is_meta for p in server.parameters()):
        materialize_half(model, server, device)  # type: ignore[arg-type]
    server.to(device)
    return name, SplitCausalLM.from_halves(None, server, model.config, cut_layer), zo_parameter_count(client, "zo")


def optimizer_and_scheduler(configured: Any) -> tuple[Optimizer, Any | None]:
    """The optimizer and (optional) scheduler of what ``configure_optimizers`` returned, for the server process."""
    if isinstance(configured, Optimizer):
        return configured, None
    if isinstance(configured, dict) and isinstance(configured.get("optimizer"), Optimizer):
        scheduler = configured.get("lr_scheduler")
        return configured["optimizer"], scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
    raise TypeError(
        "the server of a distributed run supports configure_optimizers returning one optimizer or a dict with "
        f"'optimizer' and 'lr_scheduler', got {type(configured).__name__}"
    )


def server_optimizer(
    module: LightningModule, split: SplitCausalLM, zo_halves: tuple[str, ...],
    new_zo_optimizer: Callable[[list[tuple[str, nn.Parameter]]], ZOSGD],
) -> tuple[Optimizer, Any | None]:
    """A ZO server half gets a ZOSGD (from ``new_zo_optimizer``); any other the module's own optimizer."""
    if "server" in zo_halves:
        named = [(n, p) for n, p in split.server.named_parameters() if p.requires_grad]
        for _, param in named:
            param.requires_grad_(False)
        return new_zo_optimizer(named), None
    return optimizer_and_scheduler(module.configure_optimizers())


def serve_half(
    split: SplitCausalLM, module: LightningModule, peers: Peers, mode: str, settings: ZOSettings,
    expected: dict[str, Any], new_zo_optimizer: Callable[[list[tuple[str, nn.Parameter]]], ZOSGD], schedule: str,
    checkpoint_dir: str,
) -> int:
    """Answer the connected clients with the server half until they are done; the steps served. Disconnects."""
    try:
        optimizer, scheduler = server_optimizer(module, split, get_mode(mode).zo_halves, new_zo_optimizer)
        worker = SplitServer(split, peers.client_wires, mode, settings, optimizer, scheduler, expected=expected,
                             schedule=schedule, checkpoint_dir=checkpoint_dir)
        return worker.serve()
    finally:
        peers.disconnect()
