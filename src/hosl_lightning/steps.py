"""One training step of each mode on a SplitCausalLM: hosl (ZO client, FO server), fo and zo baselines.

Each function does the forward passes, crosses the boundary, computes updates and applies the
zeroth-order ones; first-order gradients go through ``backward`` (Lightning's ``manual_backward``, so
precision plugins and gradient scaling apply) and the caller steps the first-order optimizer. That keeps
exactly one counted optimizer step per batch in Lightning's bookkeeping.

Every piece of work runs inside ``model.client_side()`` or ``model.server_side()`` (what crosses the cut
is the receiver's): that is how time and memory are attributed to each half (``hosl_lightning.memory``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hosl_lightning.model import SplitCausalLM, Targets, concat_activations
from hosl_lightning.split import CutActivations
from hosl_lightning.zo import ZOSGD, ZOEstimate, two_point_estimate

Mode = Literal["hosl", "fo", "zo"]
MODES: tuple[str, ...] = ("hosl", "fo", "zo")
ServerGrad = Literal["perturbed", "mean", "clean"]
SERVER_GRADS: tuple[str, ...] = ("perturbed", "mean", "clean")


@dataclass(frozen=True)
class ZOSettings:
    """How the two-point estimate is taken."""

    queries: int = 1
    mu: float = 1e-3
    server_grad: ServerGrad = "perturbed"
    batch_probes: bool = True


@dataclass
class StepOutput:
    loss: Tensor  # detached training loss for logging
    estimate: ZOEstimate | None = None  # the ZO update applied this step, if any


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Probe forwards run without dropout, or the two sides of a difference see different masks."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _batch_tensors(batch: dict[str, Any]) -> tuple[Tensor, Tensor | None, Targets]:
    """Inputs for the client; everything else (labels, class labels) is for the server's loss."""
    missing = [key for key in ("input_ids", "labels") if key not in batch]
    if missing:
        raise KeyError(f"a training batch needs 'input_ids' and 'labels'; missing {missing}")
    targets = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return batch["input_ids"], batch.get("attention_mask"), targets


class _Uplink:
    """Sends activations to the server; the loss targets travel once per step, with the first message.

    What arrives is the server's (received inside ``server_side``), so a client that sends each probe's
    activations as soon as they exist keeps none of them.
    """

    def __init__(self, model: SplitCausalLM, targets: Targets) -> None:
        self.model, self.targets = model, targets
        self.server_targets: Targets | None = None

    def __call__(self, activations: CutActivations) -> CutActivations:
        with self.model.server_side():
            up, sent = self.model.boundary.send_up(activations, self.targets if self.server_targets is None else None)
        if sent is not None:
            self.server_targets = sent
        return up


def hosl_step(
    model: SplitCausalLM,
    batch: dict[str, Tensor],
    client_optimizer: ZOSGD,
    settings: ZOSettings,
    step: int,
    backward: Callable[[Tensor], None],
) -> StepOutput:
    """ZO on the client (2Q perturbed forwards, no activations kept), FO on the server."""
    input_ids, attention_mask, targets = _batch_tensors(batch)
    send = _Uplink(model, targets)

    def probe(query: int, sign: float) -> CutActivations:
        perturbed = client_optimizer.perturbed([model.client], step, query, sign * settings.mu)
        with model.client_side(), torch.no_grad(), perturbed:
            return send(model.client_forward(input_ids, attention_mask))  # sent at once: the client keeps nothing

    def server_losses(ups: list[CutActivations]) -> Tensor:
        assert send.server_targets is not None
        with model.server_side():
            values = _probe_losses(model, ups, send.server_targets, settings, backward)
        with model.client_side():
            return model.boundary.send_down_losses(values)

    with eval_mode(model):
        coefficients, losses = two_point_estimate(probe, server_losses, settings.queries, settings.mu)
        loss = losses.mean()
        if settings.server_grad == "clean":  # one more client forward, at the unperturbed weights
            with model.client_side(), torch.no_grad():
                up = send(model.client_forward(input_ids, attention_mask))
            assert send.server_targets is not None
            with model.server_side():
                clean_loss = model.server_losses(up, send.server_targets)[0]
                backward(clean_loss)
            loss = clean_loss.detach()
    estimate = ZOEstimate(step, coefficients)
    with model.client_side():
        client_optimizer.step(estimate=estimate)
    return StepOutput(loss=loss, estimate=estimate)


def _probe_losses(
    model: SplitCausalLM,
    ups: list[CutActivations],
    targets: Targets,
    settings: ZOSettings,
    backward: Callable[[Tensor], None],
) -> Tensor:
    """The 2Q probe losses, with the server's backward through the points ``settings.server_grad`` names."""
    if settings.server_grad == "mean":
        values = _losses(model, ups, targets, settings.batch_probes)
        backward(values.mean())
        return values.detach()
    if settings.server_grad == "perturbed":
        first = model.server_losses(ups[0], targets)
        backward(first[0])
        with torch.no_grad():
            return torch.cat([first.detach(), _losses(model, ups[1:], targets, settings.batch_probes)])
    with torch.no_grad():
        return _losses(model, ups, targets, settings.batch_probes)


def _losses(model: SplitCausalLM, ups: list[CutActivations], targets: Targets, batched: bool) -> Tensor:
    if not ups:
        return torch.empty(0, device=targets["labels"].device)
    if batched:
        return model.server_losses(concat_activations(ups), targets, groups=len(ups))
    return torch.cat([model.server_losses(up, targets) for up in ups])


def fo_step(model: SplitCausalLM, batch: dict[str, Tensor], backward: Callable[[Tensor], None]) -> StepOutput:
    """First-order split learning: the server returns dL/dh and the client backpropagates it."""
    input_ids, attention_mask, targets = _batch_tensors(batch)
    send = _Uplink(model, targets)
    with model.client_side():  # the client keeps these activations (and their graph) until its backward
        activations = model.client_forward(input_ids, attention_mask)
        up = send(activations)
    assert send.server_targets is not None
    with model.server_side():
        server_input = up.hidden.detach().requires_grad_(True)
        up.hidden = server_input
        loss = model.server_losses(up, send.server_targets)[0]
        backward(loss)
        if server_input.grad is None:
            raise RuntimeError("the server produced no gradient at the cut")
    with model.client_side():
        gradient = model.boundary.send_down_gradient(server_input.grad)  # received by the client
        if activations.hidden.requires_grad:  # cut_layer=0 on a model whose embeddings are frozen has nothing to train
            activations.hidden.backward(gradient)
    return StepOutput(loss=loss.detach())


def zo_step(
    model: SplitCausalLM,
    batch: dict[str, Tensor],
    optimizer: ZOSGD,
    settings: ZOSettings,
    step: int,
    apply: Callable[[ZOEstimate], None],
) -> StepOutput:
    """All-zeroth-order split learning (MeZO over the split model): one shared seed perturbs both halves."""
    input_ids, attention_mask, targets = _batch_tensors(batch)
    send = _Uplink(model, targets)

    def probe(query: int, sign: float) -> Tensor:
        with torch.no_grad(), optimizer.perturbed([model.client, model.server], step, query, sign * settings.mu):
            with model.client_side():
                up = send(model.client_forward(input_ids, attention_mask))
            assert send.server_targets is not None
            with model.server_side():
                losses = model.server_losses(up, send.server_targets)
            with model.client_side():
                return model.boundary.send_down_losses(losses)

    with eval_mode(model):
        coefficients, losses = two_point_estimate(probe, torch.cat, settings.queries, settings.mu)
    estimate = ZOEstimate(step, coefficients)
    apply(estimate)
    return StepOutput(loss=losses.mean(), estimate=estimate)
