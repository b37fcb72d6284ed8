"""Client and server in separate processes: the client's side of each step, and the server's loop.

The client process runs the Lightning Trainer (data, the loop, its half, logging, checkpoints); the server
process runs :class:`SplitServer`, which answers the client's requests with its half and its optimizer. Each
step is the in-process algorithm of :mod:`hosl_lightning.steps` with every crossing of the cut replaced by a
message (:mod:`hosl_lightning.wire`): activations, the padding mask, position ids and labels go up; losses
(hosl, zo), dL/dh (fo) or evaluation scores come down. With the same seeds both runs compute the same
numbers in the same order, so they end with the same weights (tests/test_remote.py checks it bitwise).

A protocol session: ``hello`` (the client's settings, checked against the server's) -> ``ready``; then any
number of ``train`` / ``eval`` / ``save`` / ``load`` requests; then ``bye``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hosl_lightning.boundary import TrafficCounter
from hosl_lightning.clients import TurnKeeper
from hosl_lightning.model import SplitCausalLM, Targets
from hosl_lightning.split import CutActivations
from hosl_lightning.steps import (
    StepOutput,
    ZOSettings,
    _batch_tensors,
    _probe_losses,
    eval_mode,
)
from hosl_lightning.wire import (
    Message,
    PeerTimeout,
    Wire,
    check_finite,
    check_shape,
    recv_from_any,
)
from hosl_lightning.zo import ZOSGD, ZOEstimate, projected_gradients, two_point_estimate

PROTOCOL_VERSION = 1
REQUESTS = ("train", "eval", "save", "load", "await_turn", "handoff", "sync", "finish", "bye")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTEGERS = (torch.int64, torch.int32)
_MASKS = (torch.int64, torch.int32, torch.bool, torch.float32)


def server_checkpoint_path(directory: str | os.PathLike[str], name: str) -> Path:
    """Where the server keeps its half of the client checkpoint ``name``: a file name, never a path."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"a checkpoint name must be a plain file name, got {name!r}")
    return Path(directory) / f"{name}.server.pt"


def _activation_tensors(up: CutActivations) -> dict[str, Tensor | None]:
    return {"hidden": up.hidden, "attention_mask": up.attention_mask, "position_ids": up.position_ids}


def _target_tensors(targets: Targets) -> dict[str, Tensor | None]:
    return {k: v for k, v in targets.items() if isinstance(v, Tensor)}


class RemoteServer:
    """The client's handle on the server process: one method per request, every byte counted."""

    def __init__(self, wire: Wire, traffic: TrafficCounter | None = None) -> None:
        self.wire = wire
        self.traffic = traffic or TrafficCounter()
        self.training = True  # the client's train/eval flag, mirrored by the server (dropout in fo steps)

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

    def start_step(self, mode: str, step: int, targets: Targets, probes: int) -> None:
        fields = {"num_classes": int(targets["num_classes"])} if "num_classes" in targets else {}
        self._send("train", _target_tensors({k: v for k, v in targets.items() if k != "num_classes"}),
                   mode=mode, step=step, probes=probes, training=self.training, **fields)

    def send_activations(self, up: CutActivations, **fields: Any) -> None:
        self._send("act", _activation_tensors(up), **fields)

    def losses(self, count: int) -> tuple[Tensor, Tensor]:
        """The ``count`` probe losses and the step's training loss."""
        message = self._recv("losses", f"the losses of {count} probes")
        losses = check_shape(message, "losses", (count,), (torch.float32,), self.wire.peer_name)
        return losses, check_shape(message, "loss", (), (torch.float32,), self.wire.peer_name)

    def gradient(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """dL/dh at the cut (shaped like the activations sent) and the loss."""
        message = self._recv("grad", "the gradient at the cut")
        gradient = check_shape(message, "gradient", tuple(like.shape), (like.dtype,), self.wire.peer_name)
        return gradient, check_shape(message, "loss", (), (torch.float32,), self.wire.peer_name)

    def scores(self, up: CutActivations, labels: Tensor) -> Tensor:
        self._send("eval", {**_activation_tensors(up), "labels": labels})
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

    @torch.no_grad()
    def sequence_log_likelihood(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> Tensor:
        return self.remote.scores(self.client_forward(input_ids, attention_mask), labels)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "in a multi-process run the client holds only its half: the whole-model forward of a drop-in module is "
            "not available; train with hosl_lightning.HOSLModule (or transport='in_process')"
        )


# ---- the client's side of each step ----------------------------------------------------------------------


def client_hosl_step(model: ClientSplitCausalLM, batch: dict[str, Tensor], optimizer: ZOSGD, settings: ZOSettings, step: int) -> StepOutput:
    """hosl: 2Q perturbed client forwards go up as they are made; 2Q losses come down. Returns the ZO estimate to apply."""
    input_ids, attention_mask, targets = _batch_tensors(batch)
    clean = settings.server_grad == "clean"
    probes = 2 * settings.queries
    model.remote.start_step("hosl", step, targets, probes + int(clean))

    def probe(query: int, sign: float) -> None:
        with torch.no_grad(), optimizer.perturbed([model.client], step, query, sign * settings.mu):
            model.remote.send_activations(model.client_forward(input_ids, attention_mask))

    def losses(_: list[None]) -> Tensor:
        if clean:  # one more client forward, at the unperturbed weights, for the server's gradient
            with torch.no_grad():
                model.remote.send_activations(model.client_forward(input_ids, attention_mask))
        values, loss = model.remote.losses(probes)
        losses.loss = loss  # type: ignore[attr-defined]
        return values

    with eval_mode(model.client):
        coefficients, _ = two_point_estimate(probe, losses, settings.queries, settings.mu)
    return StepOutput(loss=losses.loss, estimate=ZOEstimate(step, coefficients))  # type: ignore[attr-defined]


def client_fo_step(model: ClientSplitCausalLM, batch: dict[str, Tensor], backward: Callable[..., None]) -> StepOutput:
    """fo: the activations go up with their graph kept here; dL/dh comes down and the client backpropagates it."""
    input_ids, attention_mask, targets = _batch_tensors(batch)
    model.remote.start_step("fo", 0, targets, 1)
    activations = model.client_forward(input_ids, attention_mask)
    model.remote.send_activations(activations)
    gradient, loss = model.remote.gradient(activations.hidden)
    if activations.hidden.requires_grad:
        backward(activations.hidden, gradient)
    return StepOutput(loss=loss)


def client_zo_step(model: ClientSplitCausalLM, batch: dict[str, Tensor], optimizer: ZOSGD, settings: ZOSettings, step: int) -> StepOutput:
    """zo: each probe perturbs the client here and the server there, with the same seed; losses come down."""
    input_ids, attention_mask, targets = _batch_tensors(batch)
    model.remote.start_step("zo", step, targets, 2 * settings.queries)

    def probe(query: int, sign: float) -> None:
        with torch.no_grad(), optimizer.perturbed([model.client], step, query, sign * settings.mu):
            model.remote.send_activations(model.client_forward(input_ids, attention_mask), query=query, sign=sign)

    def losses(_: list[None]) -> Tensor:
        return model.remote.losses(2 * settings.queries)[0]

    with eval_mode(model.client):
        coefficients, values = two_point_estimate(probe, losses, settings.queries, settings.mu)
    return StepOutput(loss=values.mean(), estimate=ZOEstimate(step, coefficients))


# ---- the server process ----------------------------------------------------------------------------------


class SplitServer:
    """Answers its clients' requests with the server half until every client has said ``bye``.

    Args:
        model: a :class:`SplitCausalLM` holding only the server half.
        wire: the link to the client, or one link per client rank (several clients take requests in the order
            they arrive; their turns and rounds are kept by :class:`~hosl_lightning.clients.TurnKeeper`).
        mode / settings: the run's algorithm; the client's ``hello`` must agree.
        optimizer: the server half's first-order optimizer (hosl, fo), or its ZOSGD (zo).
        scheduler: optional learning-rate scheduler of ``optimizer``, stepped once per training step.
        expected: further settings the client's ``hello`` must match (cut layer, seed, directions, ...).
        schedule: ``"sequential"`` or ``"parallel"``, for several clients.
        checkpoint_dir: where the server's halves of checkpoints go (the client names the file only).
    """

    def __init__(
        self,
        model: SplitCausalLM,
        wire: Wire | dict[int, Wire],
        mode: str,
        settings: ZOSettings,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        expected: dict[str, Any] | None = None,
        schedule: str = "sequential",
        checkpoint_dir: str | os.PathLike[str] = "server_checkpoints",
    ) -> None:
        if model.server is None:
            raise ValueError("SplitServer needs a split model that holds the server half")
        self.wires = wire if isinstance(wire, dict) else {wire.peer: wire}
        self.wire = next(iter(self.wires.values()))  # the client whose request is being answered
        self.model, self.mode, self.settings = model, mode, settings
        self.turns = TurnKeeper(sorted(self.wires), schedule, self._send_to)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.checkpoint_dir = Path(checkpoint_dir)
        self.expected = {"mode": mode, "protocol": PROTOCOL_VERSION, **(expected or {})}
        self.steps = 0  # training steps served
        self.device = next(model.server.parameters()).device

    @property
    def peer(self) -> str:
        return self.wire.peer_name

    def serve(self) -> int:
        """Run the session; returns the number of training steps served. Failures are reported to the client."""
        try:
            self._greet()
            active = dict(self.wires)
            while active:
                if len(active) == 1:
                    rank, wire = next(iter(active.items()))
                    request = wire.recv(REQUESTS, "the client's next request")
                else:
                    rank, request = recv_from_any(active, REQUESTS, "the clients' next request")
                self.wire = self.wires[rank]
                if request.kind == "bye":
                    del active[rank]
                    continue
                getattr(self, f"_on_{request.kind}")(request)
            return self.steps
        except Exception as error:
            self._report(error)
            raise

    # ---- several clients: turns, rounds and the end (see hosl_lightning.clients) ----------------------
    def _send_to(self, rank: int, kind: str, tensors: dict[str, Tensor] | None, fields: dict[str, Any]) -> None:
        self.wires[rank].send(kind, tensors, **fields)

    def _on_await_turn(self, request: Message) -> None:
        self.turns.await_turn(self.wire.peer)

    def _on_handoff(self, request: Message) -> None:
        check_finite(request, "a hand-off", self.peer)
        self.turns.handoff(self.wire.peer, request)

    def _on_sync(self, request: Message) -> None:
        check_finite(request, "a synchronisation round", self.peer)
        self.turns.sync(self.wire.peer, request)

    def _on_finish(self, request: Message) -> None:
        check_finite(request, "a client's last progress", self.peer)
        self.turns.finish(self.wire.peer, request)

    def _report(self, error: Exception) -> None:
        """Tell the client why we stop. The client may still be sending the rest of a step, so the error goes out
        without waiting and what arrives is read and dropped until the client, having read it, says ``bye``."""
        try:
            for wire in self.wires.values():
                wire.send("error", wait=False, message=f"{type(error).__name__}: {error}")
            if len(self.wires) == 1 and not isinstance(error, PeerTimeout):  # after a timeout the link is dead
                while self.wire.recv(None, "the client to read our error and stop").kind != "bye":
                    pass
            for wire in self.wires.values():
                wire.flush()
        except Exception:  # noqa: BLE001, S110 - the client is gone or stalled: no one is left to tell
            pass

    def _handshake(self) -> Message:
        hello = self.wire.recv("hello", "the client's hello")
        wrong = {k: (hello.fields.get(k), v) for k, v in self.expected.items() if hello.fields.get(k) != v}
        if wrong:
            details = "; ".join(f"{k}: client {c!r}, server {s!r}" for k, (c, s) in wrong.items())
            raise ValueError(f"the client's settings differ from the server's ({details}): run both with the same config")
        self.client_zo_params = int(hello.fields.get("client_zo_params", 0))
        return hello

    def _greet(self) -> None:
        """Every client's hello first, then ``ready`` to all: clients that replay each other's updates must
        start from the same half, which their hellos' digests show."""
        hellos = {}
        for rank, wire in self.wires.items():
            self.wire = wire
            hellos[rank] = self._handshake()
        digests = {rank: hello.fields.get("client_digest") for rank, hello in hellos.items()}
        if self.expected.get("client_sync") == "seeds" and len(set(digests.values())) > 1:
            raise ValueError(
                "client_sync='seeds' replays updates onto the same starting half, but the clients start from different "
                f"weights (digests by rank: {digests}): load the same weights in every client, or use client_sync='weights'"
            )
        for wire in self.wires.values():
            wire.send("ready")

    # ---- payloads ------------------------------------------------------------------------------------
    def _targets(self, request: Message) -> Targets:
        check_finite(request, "a training request", self.peer)
        labels = check_shape(request, "labels", (None, None), _INTEGERS, self.peer)
        targets: Targets = {"labels": labels.to(self.device)}
        if "class_labels" in request.tensors:
            targets["class_labels"] = check_shape(request, "class_labels", (None,), _INTEGERS, self.peer).to(self.device)
            targets["num_classes"] = int(request.fields["num_classes"])
        if "loss_weight" in request.tensors:
            targets["loss_weight"] = check_shape(request, "loss_weight", (), _FLOATS, self.peer).to(self.device)
        return targets

    def _activations(self, rows: int, length: int, waiting_for: str) -> tuple[CutActivations, Message]:
        message = self.wire.recv("act", waiting_for)
        return self._checked_activations(message, rows, length, waiting_for), message

    def _checked_activations(self, message: Message, rows: int, length: int, waiting_for: str) -> CutActivations:
        """The activations of ``message``, checked against the batch's labels and the model's width, on our device."""
        check_finite(message, waiting_for, self.peer)
        width = self.model.config.hidden_size
        hidden = check_shape(message, "hidden", (rows, length, width), _FLOATS, self.peer)
        mask = None
        if "attention_mask" in message.tensors:
            mask = check_shape(message, "attention_mask", (rows, length), _MASKS, self.peer)
        positions = check_shape(message, "position_ids", (None, length), _INTEGERS, self.peer)
        if positions.shape[0] not in (1, rows):
            check_shape(message, "position_ids", (rows, length), _INTEGERS, self.peer)
        device = self.device
        return CutActivations(
            hidden=hidden.to(device), attention_mask=None if mask is None else mask.to(device), position_ids=positions.to(device)
        )

    # ---- requests ------------------------------------------------------------------------------------
    def _on_train(self, request: Message) -> None:
        mode = request.fields.get("mode")
        if mode != self.mode:
            raise ValueError(f"the client asked for a {mode!r} step, this server runs mode={self.mode!r}")
        holder = self.turns.ranks[self.turns.turn]
        if self.turns.schedule == "sequential" and len(self.wires) > 1 and self.wire.peer != holder:
            raise ValueError(f"{self.peer} sent a training step during client (rank {holder})'s turn")
        targets = self._targets(request)
        rows, length = targets["labels"].shape
        self.model.train(bool(request.fields.get("training", True)))
        if mode == "fo":
            self._fo_step(targets, rows, length)
        elif mode == "hosl":
            self._hosl_step(targets, rows, length, int(request.fields["probes"]))
        else:
            self._zo_step(targets, rows, length, int(request.fields["step"]))
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1

    def _hosl_step(self, targets: Targets, rows: int, length: int, probes: int) -> None:
        settings = self.settings
        expected = 2 * settings.queries + int(settings.server_grad == "clean")
        if probes != expected:
            raise ValueError(f"the client announced {probes} probes, this server expects {expected} (q={settings.queries})")
        with eval_mode(self.model):
            ups = [self._activations(rows, length, f"probe {i + 1} of {probes}")[0] for i in range(2 * settings.queries)]
            values = _probe_losses(self.model, ups, targets, settings, lambda loss: loss.backward())
            loss = values.mean()
            if settings.server_grad == "clean":
                up = self._activations(rows, length, "the clean activations")[0]
                clean_loss = self.model.server_losses(up, targets)[0]
                clean_loss.backward()
                loss = clean_loss.detach()
        self.wire.send("losses", {"losses": values.float(), "loss": loss.float().reshape(())})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _fo_step(self, targets: Targets, rows: int, length: int) -> None:
        up, _ = self._activations(rows, length, "the activations")
        server_input = up.hidden.requires_grad_(True)
        loss = self.model.server_losses(up, targets)[0]
        loss.backward()
        assert server_input.grad is not None
        self.wire.send("grad", {"gradient": server_input.grad, "loss": loss.detach().float().reshape(())})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _zo_step(self, targets: Targets, rows: int, length: int, step: int) -> None:
        optimizer = self.optimizer
        assert isinstance(optimizer, ZOSGD)
        values = []
        with eval_mode(self.model), torch.no_grad():
            for index in range(2 * self.settings.queries):
                up, message = self._activations(rows, length, f"probe {index + 1} of {2 * self.settings.queries}")
                query, sign = index // 2, (1.0 if index % 2 == 0 else -1.0)
                if (message.fields.get("query"), message.fields.get("sign")) != (query, sign):
                    raise ValueError(f"probe {index + 1} arrived as (query, sign) = "
                                     f"({message.fields.get('query')}, {message.fields.get('sign')}), expected ({query}, {sign})")
                with optimizer.perturbed([self.model.server], step, query, sign * self.settings.mu):
                    values.append(self.model.server_losses(up, targets))
        losses = torch.cat(values).float()
        self.wire.send("losses", {"losses": losses, "loss": losses.mean()})
        optimizer.step(estimate=ZOEstimate(step, projected_gradients(losses, self.settings.mu)))

    @torch.no_grad()
    def _on_eval(self, request: Message) -> None:
        labels = check_shape(request, "labels", (None, None), _INTEGERS, self.peer).to(self.device)
        up = self._checked_activations(request, *labels.shape, "an evaluation request")
        with eval_mode(self.model):
            scores = self.model.server_scores(up, labels)
        self.wire.send("scores", {"scores": scores.float()})

    def state_dict(self) -> dict[str, Any]:
        return {
            "server": self.model.server.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.server.load_state_dict(state["server"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]

    def _on_save(self, request: Message) -> None:
        path = server_checkpoint_path(self.checkpoint_dir, str(request.fields.get("name", "")))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(self.state_dict(), partial)
        partial.replace(path)  # all or nothing: a crash mid-save leaves the previous checkpoint intact
        self.wire.send("saved")

    def _on_load(self, request: Message) -> None:
        path = server_checkpoint_path(self.checkpoint_dir, str(request.fields.get("name", "")))
        if not path.is_file():
            raise FileNotFoundError(f"the server has no checkpoint at {path} (the server's half of the client's checkpoint)")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.wire.send("loaded")
