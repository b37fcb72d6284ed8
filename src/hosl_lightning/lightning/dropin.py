"""The drop-in path: a module written for plain fine-tuning, whose own ``training_step`` is the loss oracle.

Its model's forward runs both halves, so the server half of the cut is the module's ``training_step`` itself.
:class:`DropInLink` is the :class:`~hosl_lightning.core.boundary.ClientLink` that makes it one: the mode's
client half (:mod:`hosl_lightning.modes.hosl`, the same code as every other path) perturbs the client and
asks the link for a probe; the link calls ``training_step`` there (no grad, no dropout, ``self.log``
silenced, torchmetrics put back as they were) and keeps its loss. The clean call, unperturbed and with autograd in the module's own mode, is
what Lightning backpropagates into the server and what ``self.log`` reports.

Its cost: one call of ``training_step`` per probe (2Q, or Q + 1 with ``fzoo``) and one more, clean, per
step, each a whole-model forward. The probes cannot be batched (the module's step is opaque), and the clean
call is needed anyway for the logged loss, so the server's gradient comes from it (``server_grad="clean"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from torchmetrics import Metric

from hosl_lightning.core.boundary import Targets
from hosl_lightning.core.split import CutActivations
from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.modes import READ_BY_THE_MODULE, ClientContext, StepOutput, ZOSettings, eval_mode, get_mode


@contextmanager
def silenced_logging(module: LightningModule) -> Iterator[None]:
    """Probe forwards call the user's training_step; its self.log calls must count once per step, not 2Q+1 times."""
    module.log, module.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


@contextmanager
def metrics_unchanged(module: LightningModule) -> Iterator[None]:
    """Probe forwards call the user's training_step; its torchmetrics must update once per step (in the clean
    call), not 2Q+1 times: each metric's state is put back as it was after a probe's call."""
    saved = [(metric, {name: list(value) if isinstance(value, list) else value.clone()
                       for name, value in metric.metric_state.items()}, metric._update_count, metric._computed)
             for metric in module.modules() if isinstance(metric, Metric)]
    try:
        yield
    finally:
        for metric, state, count, computed in saved:
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = count, computed


def loss_of(output: STEP_OUTPUT) -> Tensor:
    loss = output["loss"] if isinstance(output, dict) else output
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError("under HOSLStrategy, training_step must return a scalar loss tensor or a dict with 'loss'")
    return loss.detach().reshape(())


def pop_loss_weight(args: tuple[Any, ...]) -> Tensor | None:
    """A weighted subset's batch weight (``hosl_lightning.tuning``), taken out before a user's training_step sees it;
    per-example weights are refused, since a loss the module computes itself can only be scaled as a whole."""
    batch = args[0] if args else None
    weight = batch.pop("loss_weight", None) if isinstance(batch, dict) else None
    if weight is not None and weight.dim() > 0:
        raise ValueError("this batch weighs each example (SubsetSelection(granularity='per_class')), but a drop-in training_step computes its own loss, "
                         "which one weight per batch can scale and per-example weights cannot: use HOSLModule, or "
                         "granularity='batch'")
    return weight


def scaled(output: STEP_OUTPUT, weight: Tensor | None) -> STEP_OUTPUT:
    if weight is None:
        return output
    if isinstance(output, dict):
        return {**output, "loss": output["loss"] * weight.to(output["loss"].device)}
    assert isinstance(output, Tensor)
    return output * weight.to(output.device)


class DropInLink:
    """A ClientLink whose server is the module's own ``training_step`` (see the module docstring)."""

    def __init__(self, module: LightningModule, split: SplitCausalLM, training_step: Callable[[], STEP_OUTPUT],
                 weight: Tensor | None = None) -> None:
        self.module, self.split, self.training_step, self.weight = module, split, training_step, weight
        self.values: list[Tensor] = []
        self.output: STEP_OUTPUT = None

    def start(self, mode: str, step: int, targets: Targets, probes: int) -> None:
        self.values, self.output = [], None

    def up(self, forward: Callable[[], CutActivations], clean: bool = False, **fields: Any) -> None:
        # The module's forward makes the client forward itself (inside the mode's perturbation); the rest of its
        # step is the server's work.
        if clean:  # the mode makes the clean forward under no_grad (its client learns none); the server does
            with torch.enable_grad(), self.split.server_side():
                self.output = scaled(self.training_step(), self.weight)  # with autograd: trains the server
            return
        with torch.no_grad(), eval_mode(self.module), silenced_logging(self.module), metrics_unchanged(self.module), \
                self.split.server_side():
            self.values.append(loss_of(scaled(self.training_step(), self.weight)))

    def losses(self, count: int) -> tuple[Tensor, Tensor]:
        if len(self.values) != count or self.output is None:
            raise RuntimeError(f"the drop-in step made {len(self.values)} probes of {count}, clean call: "
                               f"{self.output is not None}")
        return torch.stack(self.values), loss_of(self.output)

    def gradient(self, like: Tensor, then: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        raise RuntimeError("a drop-in module trains fo by Lightning's own backward through the whole model")

    def loss(self) -> Tensor:
        raise RuntimeError("a drop-in module trains frozen by Lightning's own backward (its client has no gradient)")


def dropin_step(
    module: LightningModule, split: SplitCausalLM, optimizer: ZOSGD, settings: ZOSettings, step: int,
    training_step: Callable[[], STEP_OUTPUT], weight: Tensor | None = None,
) -> tuple[STEP_OUTPUT, StepOutput]:
    """One hosl step of a drop-in module: the mode's client half over :class:`DropInLink`, then the client's ZO
    update. Returns what Lightning backpropagates into the server (the clean call's output) and the mode's output
    (its ``loss`` is the mean probe loss, HOSLModule's ``train_loss``; the module logs its clean call's own)."""
    link = DropInLink(module, split, training_step, weight)
    output = get_mode("hosl").client_step(ClientContext(split, settings, step, optimizer), link, READ_BY_THE_MODULE)
    assert output.estimate is not None
    with split.client_side():
        optimizer.step(estimate=output.estimate)
    return link.output, output
