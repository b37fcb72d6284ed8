"""The cut: the one place where activations go from client to server and losses or gradients come back.

In-process for now: a crossing is a device move (client and server may sit on different devices) and a
byte count. Everything that travels is counted, so the communication of the three modes can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hosl_lightning.split import CutActivations


def _nbytes(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass
class TrafficCounter:
    """Bytes and messages that crossed the cut since the last :meth:`reset`."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0

    def reset(self) -> None:
        self.bytes_up = self.bytes_down = self.messages_up = self.messages_down = 0


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
        return tensor.to(device, non_blocking=True, copy=self.copy_on_send)

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
