"""The server process of a distributed run: answers its clients' requests with the server half.

Each training request runs the requested mode's server half (:mod:`hosl_lightning.modes`) over a
:class:`WireUplink`, which checks every activation that arrives against the batch's labels and the model's
width; the reply goes down and the server steps its own optimizer (and scheduler).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hosl_lightning.core.boundary import Fields, Targets
from hosl_lightning.core.split import CutActivations
from hosl_lightning.core.split_model import SplitCausalLM, forwarded_rows
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.distributed.client import PROTOCOL_VERSION
from hosl_lightning.distributed.clients import TurnKeeper
from hosl_lightning.distributed.wire import Message, PeerTimeout, Wire, check_finite, check_shape, recv_from_any
from hosl_lightning.modes import get_mode
from hosl_lightning.modes.base import ServerContext, ZOSettings, ensure_finite, eval_mode

REQUESTS = ("train", "eval", "save", "load", "await_turn", "handoff", "sync", "finish", "bye")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTEGERS = (torch.int64, torch.int32)
_MASKS = (torch.int64, torch.int32, torch.bool, torch.float32)


def server_checkpoint_path(directory: str | os.PathLike[str], name: str) -> Path:
    """Where the server keeps its half of the client checkpoint ``name``: a file name, never a path."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"a checkpoint name must be a plain file name, got {name!r}")
    return Path(directory) / f"{name}.server.pt"



class SplitServer:
    """Answers its clients' requests with the server half until every client has said ``bye``.

    Args:
        model: a :class:`SplitCausalLM` holding only the server half.
        wire: the link to the client, or one link per client rank (several clients take requests in the order
            they arrive; their turns and rounds are kept by :class:`~hosl_lightning.distributed.clients.TurnKeeper`).
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
        self._mode = get_mode(mode)
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

    # ---- several clients: turns, rounds and the end (see hosl_lightning.distributed.clients) ----------------------
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
        directions = {rank: hello.fields.get("directions") for rank, hello in hellos.items()}
        if self.expected.get("client_sync") == "seeds" and len({str(d) for d in directions.values()}) > 1:
            raise ValueError(
                "client_sync='seeds' replays each client's directions on the others, but the clients draw them "
                f"differently (by rank: {directions}): put every client's half on the same device type"
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
            if request.tensors["loss_weight"].dim() != 0:
                raise ValueError(f"{self.peer} sent one loss weight per example: per-example weights (SubsetSelection's "
                                 "granularity='per_class') run in-process only; a distributed run takes one per batch")
            targets["loss_weight"] = check_shape(request, "loss_weight", (), _FLOATS, self.peer).to(self.device)
        if "source_rows" in request.tensors:  # shared prompts: fewer rows forwarded than labelled
            source_rows = check_shape(request, "source_rows", (labels.shape[0],), _INTEGERS, self.peer)
            forwarded = forwarded_rows(source_rows, len(source_rows))
            if len(source_rows) and (int(source_rows.min()) < 0 or len(source_rows.unique()) != forwarded):
                raise ValueError(f"{self.peer} sent source_rows that do not name each of {forwarded} forwarded rows")
            targets["source_rows"] = source_rows.to(self.device)
        return targets

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
        probes, expected = int(request.fields.get("probes", -1)), self._mode.probes(self.settings)
        if probes != expected:
            raise ValueError(f"the client announced {probes} probes, this server expects {expected} (q={self.settings.queries})")
        self.model.train(bool(request.fields.get("training", True)))
        step = int(request.fields["step"])
        zo = self.optimizer if isinstance(self.optimizer, ZOSGD) else None
        context = ServerContext(self.model, self.settings, lambda loss: loss.backward(), zo)
        rows, length = targets["labels"].shape
        rows = forwarded_rows(targets.get("source_rows"), rows)
        reply = self._mode.server_step(context, WireUplink(self, rows, length), targets, step)
        for key, value in reply.items():  # a diverged step stops here, before the server's weights take it
            ensure_finite(step, f"the server's {key}", value)
        self.wire.send(self._mode.reply_to(self.settings), reply)
        if zo is not None:  # the server half's share of the all-ZO update: the client's estimate, from the same losses
            if "zo_lr" in request.fields:  # at the client's scheduled zo_lr
                for group in zo.param_groups:
                    group["lr"] = float(request.fields["zo_lr"])
            zo.step(estimate=zo.estimate(step, zo.coefficients(reply["losses"], self.settings.mu)))
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1

    @torch.no_grad()
    def _on_eval(self, request: Message) -> None:
        labels = check_shape(request, "labels", (None, None), _INTEGERS, self.peer).to(self.device)
        rows, length = labels.shape
        source_rows = None
        if "source_rows" in request.tensors:  # shared prompts: fewer rows forwarded than scored
            source_rows = check_shape(request, "source_rows", (rows,), _INTEGERS, self.peer).to(self.device)
            forwarded = int(request.tensors["hidden"].shape[0]) if "hidden" in request.tensors else 0
            if rows and not 0 <= int(source_rows.min()) <= int(source_rows.max()) < forwarded:
                raise ValueError(f"{self.peer} sent source_rows outside the {forwarded} rows forwarded")
            rows = forwarded
        up = self._checked_activations(request, rows, length, "an evaluation request")
        with eval_mode(self.model):
            scores = self.model.server_scores(up, labels, source_rows)
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


class WireUplink:
    """The server half's view of a step's activations over the wire: each one checked as it arrives."""

    def __init__(self, server: SplitServer, rows: int, length: int) -> None:
        self.server, self.rows, self.length = server, rows, length

    def receive(self, waiting_for: str) -> tuple[CutActivations, Fields]:
        message = self.server.wire.recv("act", waiting_for)
        return self.server._checked_activations(message, self.rows, self.length, waiting_for), message.fields
