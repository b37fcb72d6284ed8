"""The cut: the one place where activations go from client to server and losses or gradients come back.

A mode (:mod:`hosl_lightning.modes`) is written once against two small protocols: :class:`ClientLink`, the
client's view of a step (send targets and activations up; receive losses or dL/dh), and :class:`Uplink`, the
server's view (receive the step's activations in the order they were sent). Each has an in-process
implementation here (:class:`InProcessLink`, a device move and a byte count per crossing) and a wire
implementation over torch.distributed (:mod:`hosl_lightning.distributed`). Everything that crosses is
counted, so the communication of the modes can be compared.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from hosl_lightning.core.split import CutActivations


def _nbytes(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass
class TrafficCounter:
    """Bytes and messages that crossed the cut since the last ``reset()``."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0

    def reset(self) -> None:
        self.bytes_up = self.bytes_down = self.messages_up = self.messages_down = 0


def may_copy_asynchronously(source: torch.device, target: torch.device) -> bool:
    """Only a host-to-device copy may be asynchronous: the host reads what comes down to it (losses, dL/dh,
    scores) at once, before a non-blocking device-to-host copy would have finished."""
    return source.type == "cpu" and target.type != "cpu"


@dataclass
class InProcessBoundary:
    """Moves payloads between the client's and the server's devices and counts what crosses."""

    client_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    server_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    traffic: TrafficCounter = field(default_factory=TrafficCounter)
    # Deliver copies, as a wire would, so sender and receiver never share a tensor. Off for training (same
    # device: no copy at all); memory measurement turns it on so each side's account holds only its own data.
    copy_on_send: bool = False

    def send_up(
        self, activations: CutActivations, targets: dict[str, Any] | None = None
    ) -> tuple[CutActivations, dict[str, Any] | None]:
        """Client -> server: activations, the padding mask, position ids and (optionally) the loss targets."""
        tensors = [activations.hidden, activations.attention_mask, activations.position_ids]
        tensors += [v for v in (targets or {}).values() if isinstance(v, Tensor)]
        self.traffic.bytes_up += sum(_nbytes(t) for t in tensors)
        self.traffic.messages_up += 1
        moved = replace(
            activations,
            hidden=self._deliver(activations.hidden, self.server_device),
            attention_mask=None if activations.attention_mask is None else self._deliver(activations.attention_mask, self.server_device),
            position_ids=self._deliver(activations.position_ids, self.server_device),
        )
        if targets is None:
            return moved, None
        return moved, {k: self._deliver(v, self.server_device) if isinstance(v, Tensor) else v for k, v in targets.items()}

    def _deliver(self, tensor: Tensor, device: torch.device) -> Tensor:
        return tensor.to(device, non_blocking=may_copy_asynchronously(tensor.device, device), copy=self.copy_on_send)

    def send_down_losses(self, losses: Tensor) -> Tensor:
        """Server -> client: scalar losses (all the ZO client needs back)."""
        self.traffic.bytes_down += _nbytes(losses)
        self.traffic.messages_down += 1
        return self._deliver(losses.detach(), self.client_device)

    def send_down_gradient(self, gradient: Tensor) -> Tensor:
        """Server -> client: dL/dh at the cut (first-order split learning)."""
        self.traffic.bytes_down += _nbytes(gradient)
        self.traffic.messages_down += 1
        return self._deliver(gradient, self.client_device)


# what the server needs for a loss: "labels"; "class_labels"/"num_classes"; "loss_weight" (one number, or one per
# example); "source_rows" (shared prompts: each labels row's source among the rows forwarded)
Targets = dict[str, Any]
Reply = dict[str, Tensor]  # what a server half sends down: {"losses", "loss"}, {"gradient", "loss"} or {"loss"}
Fields = dict[str, Any]  # small JSON-able facts that travel with activations (a zo probe's query and sign)


class ClientLink(Protocol):
    """The client half's view of the cut during one training step."""

    def start(self, mode: str, step: int, targets: Targets, probes: int) -> None:
        """Open a step: its loss targets go up once, with the number of activations that will follow."""

    def up(self, forward: Callable[[], CutActivations], **fields: Any) -> CutActivations | None:
        """Run the client forward ``forward`` and send its activations up; returns them (the client may keep
        them, as fo does for its backward). A link whose server needs the whole model (the drop-in path) may
        evaluate its loss instead and return None."""

    def losses(self, count: int) -> tuple[Tensor, Tensor]:
        """The ``count`` probe losses, in the order sent, and the step's training loss."""

    def gradient(self, like: Tensor, then: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """dL/dh at the cut, shaped like the activations sent, and the loss; ``then(gradient)`` runs as the
        client's work on its arrival (fo's backward)."""

    def loss(self) -> Tensor:
        """The step's training loss alone: all that a client which does not learn gets back (frozen)."""


class Uplink(Protocol):
    """The server half's view of the cut: the step's activations, one at a time, in the order sent."""

    def receive(self, waiting_for: str) -> tuple[CutActivations, Fields]:
        """The next activations (on the server's device) and the fields sent with them."""


ServerStep = Callable[[str, Uplink, Targets, int], Reply]  # (mode, uplink, targets, step) -> reply


class _Queue:
    """An in-process Uplink: what the client sent, waiting for the server half to read it."""

    def __init__(self) -> None:
        self.items: deque[tuple[CutActivations, Fields]] = deque()

    def receive(self, waiting_for: str) -> tuple[CutActivations, Fields]:
        if not self.items:
            raise RuntimeError(f"the server half waited for {waiting_for}, but the client sent nothing more")
        return self.items.popleft()


class InProcessLink:
    """Both halves in this process: activations queue on the server's side until the client asks for the
    reply, then the mode's server half runs over them (one batched server forward is possible that way).

    ``client_side`` / ``server_side`` wrap each half's work, so time and memory go to the half that does it;
    what crosses is the receiver's.
    """

    def __init__(
        self,
        boundary: InProcessBoundary,
        server_step: ServerStep,
        client_side: Callable[[], AbstractContextManager[Any]] = nullcontext,
        server_side: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.boundary, self.server_step = boundary, server_step
        self.client_side, self.server_side = client_side, server_side
        self.queue = _Queue()
        self.mode, self.step = "", -1  # of the open step
        self.targets: Targets | None = None  # on the server's side, once the first activations brought them
        self._unsent: Targets | None = None  # they travel with the first activations, as one message would

    def start(self, mode: str, step: int, targets: Targets, probes: int) -> None:
        self.queue.items.clear()
        self.mode, self.step, self.targets, self._unsent = mode, step, None, targets

    def up(self, forward: Callable[[], CutActivations], **fields: Any) -> CutActivations:
        activations = forward()
        with self.server_side():
            moved, delivered = self.boundary.send_up(activations, self._unsent)
        if delivered is not None:
            self.targets, self._unsent = delivered, None
        self.queue.items.append((moved, fields))
        return activations

    def _reply(self) -> Reply:
        if self.targets is None:
            raise RuntimeError("the client asked for a reply before it sent anything in this step")
        with self.server_side():
            reply = self.server_step(self.mode, self.queue, self.targets, self.step)
        if self.queue.items:
            raise RuntimeError(f"the server half left {len(self.queue.items)} activations unread")
        return reply

    def losses(self, count: int) -> tuple[Tensor, Tensor]:
        reply = self._reply()
        with self.client_side():
            values = self.boundary.send_down_losses(reply["losses"])
        if values.numel() != count:
            raise RuntimeError(f"the server half returned {values.numel()} losses for {count} probes")
        return values, reply["loss"].detach()

    def gradient(self, like: Tensor, then: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        reply = self._reply()
        with self.client_side():
            gradient = self.boundary.send_down_gradient(reply["gradient"])
            if then is not None:
                then(gradient)
        return gradient, reply["loss"].detach()

    def loss(self) -> Tensor:
        reply = self._reply()
        with self.client_side():
            return self.boundary.send_down_losses(reply["loss"])
