"""frozen: the client half never learns (d_c = 0); the server learns by backprop. The baseline that tells
whether a learning client (hosl's ZO, fo's backprop) is worth what it costs.

Client half: one client forward per step without autograd, in the model's own train/eval mode, sent up; no
optimizer, no directions, nothing kept. Server half: fo's (the loss of the received activations and its
backward), except that nothing goes back down but the loss: no dL/dh, since the client has no use for it.
Per step: one activation up, one scalar down.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from hosl_lightning.core.boundary import ClientLink, Reply, Targets, Uplink
from hosl_lightning.modes.base import ClientContext, Mode, ServerContext, StepInputs, StepOutput, ensure_finite
from hosl_lightning.modes.fo import one_activation


def client_step(ctx: ClientContext, link: ClientLink, inputs: StepInputs) -> StepOutput:
    model = ctx.model
    link.start("frozen", ctx.step, inputs.targets, 1)
    with torch.no_grad():  # the client's weights take no gradient: keep no graph
        link.up(lambda: model.client_forward(inputs.input_ids, inputs.attention_mask))
    return StepOutput(loss=ensure_finite(ctx.step, "the training loss", link.loss()))


def server_step(ctx: ServerContext, uplink: Uplink, targets: Targets, step: int) -> Reply:
    up, _ = uplink.receive("the activations")
    loss = ctx.model.server_losses(up, targets)[0]
    ctx.backward(loss)
    return {"loss": loss.detach().float().reshape(())}


class NoUpdate(Optimizer):
    """The optimizer of a client process whose half never learns: Lightning counts one step per batch by optimizer
    steps, and this one changes nothing and holds no state. Its learning rate reads 0, for whatever logs one."""

    def __init__(self) -> None:
        super().__init__([{"params": []}], {"lr": 0.0})

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return None if closure is None else closure()


MODE = Mode(name="frozen", zo_halves=(), frozen_halves=("client",), client_step=client_step, server_step=server_step,
            reply="loss", probes=one_activation, options=())  # no ZO options, no client backprop
