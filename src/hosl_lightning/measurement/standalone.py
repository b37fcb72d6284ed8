"""Stand-alone measurements of the client's peak memory, outside a Lightning run (benchmarks, examples)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hosl_lightning.core.fused_update import FusedUpdate
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.measurement.meter import StepMemoryMeter
from hosl_lightning.measurement.reports import ClientMemory
from hosl_lightning.measurement.sides import SideSwitch
from hosl_lightning.modes import ModeName, ZOSettings, batch_tensors, eval_mode
from hosl_lightning.modes.in_process import fo_step, hosl_step, in_process_step, zo_step

if TYPE_CHECKING:
    from hosl_lightning.core.split_model import SplitCausalLM


def measure_client_step(
    model: SplitCausalLM,
    batch: dict[str, Tensor],
    mode: ModeName,
    settings: ZOSettings | None = None,
    client_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] = torch.optim.AdamW,
    zo_optimizer: Callable[[list[tuple[str, nn.Parameter]]], ZOSGD] | None = None,
    client_checkpointing: bool = False,
    fused_client_update: bool = False,
) -> ClientMemory:
    """Run two steps of ``mode`` (``fo``, ``hosl``, ``zo`` or ``frozen``) and return the client's peak memory during them, by category at the peak (the
    second runs with the optimizer's state, if it keeps any, as every step after the first does).
    Measured with the tracker on any device. It changes the weights: use a throwaway model.

    ``client_optimizer``: builds fo's client optimizer from the client's parameters (a class will do);
    ``zo_optimizer``: builds hosl's or zo's from the client's named parameters (ZO-SGD with lr 0 by default).
    ``client_checkpointing`` and ``fused_client_update``: fo's memory options, as ``HOSLStrategy``'s.
    """
    client_params = [p for p in model.client.parameters()]
    switch = SideSwitch()
    saved = model.client_side, model.server_side
    switch.install(model)
    try:
        for p in client_params:
            p.requires_grad_(mode == "fo")
        meter = StepMemoryMeter(model, switch, sides=("client",), method="tracker")
        if (client_checkpointing or fused_client_update) and mode != "fo":
            raise ValueError(f"client_checkpointing and fused_client_update apply to mode 'fo', not {mode!r}")
        model.client.stack.checkpointing = client_checkpointing
        if mode == "fo":
            optimizer = client_optimizer(client_params)
            fused = (FusedUpdate(optimizer, client_params, [m for m in model.client.modules()
                                                           if isinstance(m, nn.Embedding)]).attach()
                     if fused_client_update else None)
            with meter:
                for _ in range(2):
                    fo_step(model, batch, backward=lambda loss: loss.backward())
                    with model.client_side():
                        optimizer.step()  # fused: nothing left to step here (every gradient is gone)
                        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as in training
            if fused is not None:
                fused.detach()
        elif mode == "frozen":
            with meter:
                for step in range(2):
                    in_process_step(model, "frozen", batch, ZOSettings(), step, backward=lambda loss: loss.backward())
        else:
            named = list(model.client.named_parameters())
            zo = ZOSGD(named, lr=0.0) if zo_optimizer is None else zo_optimizer(named)
            settings = settings or ZOSettings(queries=zo.min_queries, estimator=zo.estimator)
            with meter:
                for step in range(2):  # as fo: the second step runs with any state the optimizer keeps
                    if mode == "hosl":
                        hosl_step(model, batch, zo, settings, step, backward=lambda loss: loss.backward())
                    else:
                        zo_step(model, batch, zo, settings, step, apply=partial(_client_step, model, zo))
    finally:
        model.client_side, model.server_side = saved
        model.client.stack.checkpointing = False
    return meter.peak_breakdown("client")


def _client_step(model: SplitCausalLM, optimizer: ZOSGD, estimate: Any) -> None:
    with model.client_side():
        optimizer.step(estimate=estimate)


def measure_client_inference(model: SplitCausalLM, batch: dict[str, Tensor]) -> ClientMemory:
    """The floor: the client's weights plus one no-grad forward's working set, of the rows a step forwards
    (a classification batch's shared prompts once, ``batch_tensors``)."""
    # only now, as a measurement is made: torch's private MemTracker
    from hosl_lightning.measurement.tracker import SideTracker, peak_of

    tracker = SideTracker(model.client.parameters())
    tracker.track_external(model.client)
    with tracker, torch.no_grad(), eval_mode(model):
        input_ids, attention_mask = (batch_tensors(batch)[:2] if "labels" in batch
                                     else (batch["input_ids"], batch.get("attention_mask")))
        model.client_forward(input_ids, attention_mask)
    return peak_of(tracker, model.client_device)
