"""fo: first-order split learning, the baseline. The server returns dL/dh at the cut; the client backpropagates it.

Client half: one client forward with autograd, kept until dL/dh comes back. Server half: a forward from the
received activations (a fresh leaf, so the gradient at the cut is the server's to send), the loss, backward.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from hosl_lightning.core.boundary import ClientLink, Reply, Targets, Uplink
from hosl_lightning.core.split import CutActivations
from hosl_lightning.modes.base import (
    ClientContext,
    Mode,
    ServerContext,
    StepInputs,
    StepOutput,
    ZOSettings,
    ensure_finite,
)


def client_step(ctx: ClientContext, link: ClientLink, inputs: StepInputs) -> StepOutput:
    input_ids, attention_mask, targets = inputs.input_ids, inputs.attention_mask, inputs.targets
    model = ctx.model
    link.start("fo", ctx.step, targets, 1)
    activations = link.up(lambda: model.client_forward(input_ids, attention_mask))  # kept, with its graph
    assert activations is not None, "fo's client half backpropagates its own activations"
    _, loss = link.gradient(activations.hidden, then=lambda gradient: _backward(ctx, activations, gradient))
    return StepOutput(loss=ensure_finite(ctx.step, "the training loss", loss))


def _backward(ctx: ClientContext, activations: CutActivations, gradient: Tensor) -> None:
    if not _skipped_by_the_scaler(ctx.grad_scaler, gradient):
        ensure_finite(ctx.step, "the gradient at the cut (dL/dh)", gradient)
    if activations.hidden.requires_grad:  # cut_layer=0 on a model whose embeddings are frozen has nothing to train
        ctx.backward(activations.hidden, gradient)


def _skipped_by_the_scaler(scaler: Any, gradient: Tensor) -> bool:
    """Whether a non-finite dL/dh is an fp16 overflow of the scaled gradient that ``scaler`` will skip.

    The client backpropagates it anyway, so its gradients are non-finite too and the scaler skips the step of
    both halves and lowers its scale: not a divergence. It is one when the scale has nothing left to back off
    (at most 1: the unscaled gradient overflows); a non-finite loss is checked apart (:func:`client_step`).
    """
    if scaler is None or not scaler.is_enabled() or bool(torch.isfinite(gradient).all()):
        return False
    return scaler.get_scale() > 1.0


def server_step(ctx: ServerContext, uplink: Uplink, targets: Targets, step: int) -> Reply:
    up, _ = uplink.receive("the activations")
    server_input = up.hidden.detach().requires_grad_(True)
    loss = ctx.model.server_losses(replace(up, hidden=server_input), targets)[0]
    ctx.backward(loss)
    if server_input.grad is None:
        raise RuntimeError("the server produced no gradient at the cut")
    return {"gradient": server_input.grad, "loss": loss.detach().float().reshape(())}


def one_activation(settings: ZOSettings) -> int:
    return 1


MODE = Mode(name="fo", zo_halves=(), client_step=client_step, server_step=server_step, reply="grad",
            probes=one_activation, options=("client_checkpointing", "fused_client_update"))  # a backprop client's memory
