"""The client process's end of the cut: the wire implementation of :class:`~hosl_lightning.core.boundary.ClientLink`.

The client process runs the Lightning Trainer (data, the loop, its half, logging, checkpoints) and each
mode's client half (:mod:`hosl_lightning.modes`) over a :class:`RemoteServer`: activations, the padding mask,
position ids and labels go up as messages (:mod:`hosl_lightning.distributed.wire`); losses (hosl, zo), dL/dh
(fo), the loss alone (frozen) or evaluation scores come down. The server process runs the same mode's server half
(:mod:`hosl_lightning.distributed.server`), so both runs compute the same numbers in the same order.

A protocol session: ``hello`` (the client's settings, checked against the server's) -> ``ready``; then any
number of ``train`` / ``eval`` / ``save`` / ``load`` requests; then ``bye``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hosl_lightning.core.boundary import Targets, TrafficCounter
from hosl_lightning.core.split import CutActivations
from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.distributed.wire import Message, Wire, check_finite, check_shape

PROTOCOL_VERSION = 1


def _activation_tensors(up: CutActivations) -> dict[str, Tensor | None]:
    return {"hidden": up.hidden, "attention_mask": up.attention_mask, "position_ids": up.position_ids}


def _target_tensors(targets: Targets) -> dict[str, Tensor | None]:
    return {k: v for k, v in targets.items() if isinstance(v, Tensor)}


class RemoteServer:
    """The client's handle on the server process: a ClientLink for steps, one method per other request, every
    byte counted."""

    def __init__(self, wire: Wire, traffic: TrafficCounter | None = None) -> None:
        self.wire = wire
        self.traffic = traffic or TrafficCounter()
        self.training = True  # the client's train/eval flag, mirrored by the server (dropout in fo steps)
        self.zo_lr: float | None = None  # the client's current zo_lr (scheduled), which zo's server half takes too

    def _send(self, kind: str, tensors: dict[str, Tensor | None] | None = None, **fields: Any) -> None:
        self.traffic.bytes_up += self.wire.send(kind, tensors, **fields)
        self.traffic.messages_up += 1

    def _recv(self, kind: str, waiting_for: str) -> Message:
        message = self.wire.recv(kind, waiting_for)
        self.traffic.bytes_down += message.payload_bytes
        self.traffic.messages_down += 1
        check_finite(message, waiting_for, self.wire.peer_name)
        return message

    def hello(self, **settings: Any) -> None:
        self.wire.send("hello", protocol=PROTOCOL_VERSION, **settings)  # not traffic of a step
        self.wire.recv("ready", "the server to accept our settings")

    # ---- ClientLink: one training step --------------------------------------------------------------
    def start(self, mode: str, step: int, targets: Targets, probes: int) -> None:
        fields = {"num_classes": int(targets["num_classes"])} if "num_classes" in targets else {}
        if self.zo_lr is not None:
            fields["zo_lr"] = self.zo_lr
        self._send("train", _target_tensors({k: v for k, v in targets.items() if k != "num_classes"}),
                   mode=mode, step=step, probes=probes, training=self.training, **fields)

    def up(self, forward: Callable[[], CutActivations], **fields: Any) -> CutActivations:
        activations = forward()
        self._send("act", _activation_tensors(activations), **{k: v for k, v in fields.items() if k != "clean"})
        return activations

    def losses(self, count: int) -> tuple[Tensor, Tensor]:
        """The ``count`` probe losses and the step's training loss."""
        message = self._recv("losses", f"the losses of {count} probes")
        losses = check_shape(message, "losses", (count,), (torch.float32,), self.wire.peer_name)
        return losses, check_shape(message, "loss", (), (torch.float32,), self.wire.peer_name)

    def gradient(self, like: Tensor, then: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """dL/dh at the cut (shaped like the activations sent) and the loss; ``then(gradient)`` on arrival."""
        message = self._recv("grad", "the gradient at the cut")
        gradient = check_shape(message, "gradient", tuple(like.shape), (like.dtype,), self.wire.peer_name)
        loss = check_shape(message, "loss", (), (torch.float32,), self.wire.peer_name)
        if then is not None:
            then(gradient)
        return gradient, loss

    def loss(self) -> Tensor:
        """The step's training loss alone (a frozen client)."""
        message = self._recv("loss", "the training loss")
        return check_shape(message, "loss", (), (torch.float32,), self.wire.peer_name)

    def scores(self, up: CutActivations, labels: Tensor, source_rows: Tensor | None = None) -> Tensor:
        """Each row's score; with ``source_rows``, ``up`` holds only the forwarded rows (shared prompts)."""
        self._send("eval", {**_activation_tensors(up), "labels": labels, "source_rows": source_rows})
        message = self._recv("scores", "evaluation scores")
        return check_shape(message, "scores", (labels.shape[0],), (torch.float32,), self.wire.peer_name)

    def save(self, name: str) -> None:
        """Ask the server to save its half of the checkpoint ``name`` (a file name: the server picks the folder)."""
        self.wire.send("save", name=name)
        self.wire.recv("saved", f"the server to save its half of {name}")

    def load(self, name: str) -> None:
        self.wire.send("load", name=name)
        self.wire.recv("loaded", f"the server to load its half of {name}")

    def close(self) -> None:
        self.wire.send("bye")


class ClientSplitCausalLM(SplitCausalLM):
    """The client process's split model: the client half here, the server half behind :class:`RemoteServer`."""

    remote: RemoteServer

    def scores_across(self, activations: CutActivations, labels: Tensor, source_rows: Tensor | None) -> Tensor:
        return self.remote.scores(activations, labels, source_rows)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "in a multi-process run the client holds only its half: the whole-model forward of a drop-in module is "
            "not available; train with hosl_lightning.HOSLModule (or transport='in_process')"
        )
