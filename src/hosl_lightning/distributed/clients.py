"""Several clients against one server: who trains when, and how the client halves are kept in step.

- ``sequential`` (sequential split learning): clients take turns of ``steps_per_turn`` steps; at the end of
  its turn a client hands its half's progress on, and the next client starts from it.
- ``parallel`` (split-federated learning): clients train at the same time against the one server; every
  ``sync_every_n_steps`` steps their halves are averaged.

What passes between clients (always through the server, the one peer every client has) is either the ZO
updates as (seed, step, lr, coefficients) (``client_sync="seeds"``, see :mod:`hosl_lightning.distributed.sync`) or the
half's weights (``"weights"``; the only choice in ``fo`` mode, whose client updates are not seeded).
:class:`TurnKeeper` is the server's bookkeeping, :class:`ClientSync` the client's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.distributed.sync import ZOUpdate, encoded_size, replay, weight_bytes, weights_of
from hosl_lightning.distributed.wire import Message, Wire, check_finite


@dataclass
class TurnKeeper:
    """The server's view of its clients: whose turn it is, the updates each has not seen, the open round."""

    ranks: list[int]
    schedule: str
    send: Callable[[int, str, dict[str, Tensor] | None, dict[str, Any]], None]  # (rank, kind, tensors, fields)
    turn: int = 0  # index into ranks of the client whose turn it is (sequential)
    log: list[tuple[int, list]] = field(default_factory=list)  # (origin rank, update as JSON) in order
    seen: dict[int, int] = field(default_factory=dict)  # per rank: how much of the log it has applied
    weights: dict[str, Tensor] | None = None  # the latest handed-on weights (sequential, weights)
    weights_from: int | None = None
    waiting: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)
    round: dict[int, Message] = field(default_factory=dict)  # parallel: this round's sync messages

    def __post_init__(self) -> None:
        self.seen = {rank: 0 for rank in self.ranks}

    # ---- sequential ----------------------------------------------------------------------------------
    def _missed(self, rank: int) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
        updates = [u for origin, u in self.log[self.seen[rank]:] if origin != rank]
        self.seen[rank] = len(self.log)
        fresh = self.weights if self.weights is not None and self.weights_from != rank else None
        return fresh, {"updates": updates}

    def _grant(self) -> None:
        holder = self.ranks[self.turn]
        if holder in self.waiting:
            self.waiting.discard(holder)
            tensors, fields = self._missed(holder)
            self.send(holder, "turn", tensors, fields)

    def await_turn(self, rank: int) -> None:
        self.waiting.add(rank)
        self._grant()

    def handoff(self, rank: int, message: Message) -> None:
        if self.ranks[self.turn] != rank:
            raise ValueError(f"client (rank {rank}) handed on a turn that was client (rank {self.ranks[self.turn]})'s")
        self._record(rank, message)
        self._advance()

    def _record(self, rank: int, message: Message) -> None:
        self.log += [(rank, u) for u in message.fields.get("updates", [])]
        self.seen[rank] = len(self.log)
        if message.tensors:
            self.weights, self.weights_from = dict(message.tensors), rank

    def _advance(self) -> None:
        for _ in self.ranks:  # the next client that is still training
            self.turn = (self.turn + 1) % len(self.ranks)
            if self.ranks[self.turn] not in self.finished:
                break
        self._grant()

    def finish(self, rank: int, message: Message) -> None:
        """A client is done training: record its last progress, and once all are done send each the rest."""
        self._record(rank, message)
        self.finished.add(rank)
        if self.schedule == "sequential" and self.ranks[self.turn] == rank:
            self._advance()
        if self.schedule == "parallel":
            self._close_round()  # the others may be waiting for this client's part of a round
        if len(self.finished) == len(self.ranks):
            for other in self.ranks:
                tensors, fields = self._missed(other)
                self.send(other, "final", tensors, fields)

    # ---- parallel ------------------------------------------------------------------------------------
    def sync(self, rank: int, message: Message) -> None:
        self.round[rank] = message
        self._close_round()

    def _close_round(self) -> None:
        """A round closes when every client still training has sent its part (finished clients sit it out)."""
        members = [r for r in self.ranks if r not in self.finished]
        if not self.round or any(r not in self.round for r in members):
            return
        messages = [self.round[r] for r in members]
        self.round = {}
        updates = [[r, u] for r, m in zip(members, messages) for u in m.fields.get("updates", [])]
        average = None
        if messages[0].tensors:
            average = {k: sum(m.tensors[k] for m in messages) / len(messages) for k in messages[0].tensors}
        for r in members:
            self.send(r, "synced", average, {"updates": updates, "clients": len(members)})


class ClientSync:
    """The client's side: waits for its turn or syncs its round, and applies what the others did."""

    def __init__(self, wire: Wire, half: nn.Module, optimizer: ZOSGD | None, schedule: str, client_sync: str,
                 steps_per_turn: int, sync_every_n_steps: int) -> None:
        self.wire, self.half, self.optimizer = wire, half, optimizer
        self.schedule, self.client_sync = schedule, client_sync
        self.steps_per_turn, self.sync_every_n_steps = steps_per_turn, sync_every_n_steps
        self.pending: list[ZOUpdate] = []  # own updates not yet handed on / synced
        # parallel seed sync: the ZO weights at the round's start, which every client holds bit for bit; each
        # round ends by going back to them and replaying everyone's updates in one order, so that the clients
        # stay identical (undoing our own updates by replaying them at scale -1 would leave rounding behind)
        self.anchor: list[Tensor] | None = None  # taken before the first step (after a checkpoint has loaded)
        self.holds_turn = False
        self.steps = 0  # steps in this turn (sequential) or since the last sync (parallel)
        self.bytes_up = self.bytes_down = 0  # what synchronisation cost, all told

    def _zo_params(self) -> list[Tensor]:
        assert self.optimizer is not None
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _payload(self) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
        if self.client_sync == "weights":
            weights = weights_of(self.half)
            self.bytes_up += weight_bytes(weights)
            return weights, {}
        self.bytes_up += encoded_size(self.pending)
        return None, {"updates": [u.to_json() for u in self.pending]}

    def _receive(self, kind: str, waiting_for: str, timeout_s: float) -> Message:
        message = self.wire.recv(kind, waiting_for, timeout_s=timeout_s)
        check_finite(message, waiting_for, self.wire.peer_name)
        return message

    def _apply(self, message: Message, averaged: bool = False) -> None:
        """Load handed-on or averaged weights, or replay the updates of the others (averaged: everyone's, from the
        round's start)."""
        if message.tensors:
            self.bytes_down += weight_bytes(message.tensors)
            self.half.load_state_dict(message.tensors, strict=False)
            return
        raw = message.fields.get("updates", [])
        if not raw:
            return  # nothing new (the first turn, or nothing happened since ours)
        self.bytes_down += encoded_size([ZOUpdate.from_json(u[1] if averaged else u) for u in raw])
        assert self.optimizer is not None
        if not averaged:  # sequential: the others' updates, in order, exactly as they were applied
            replay(self.optimizer, [ZOUpdate.from_json(u) for u in raw])
            return
        clients = int(message.fields["clients"])
        params = self._zo_params()
        assert self.anchor is not None, "a parallel round starts in before_step"
        with torch.no_grad():
            for param, start in zip(params, self.anchor):
                param.copy_(start)  # back to the round's start, exactly
            replay(self.optimizer, [ZOUpdate.from_json(u) for _, u in raw], scale=1.0 / clients)
            for param, start in zip(params, self.anchor):
                start.copy_(param)  # the next round's start

    def before_step(self, wait_s: float) -> None:
        if self.anchor is None and self.schedule == "parallel" and self.client_sync == "seeds" \
                and self.optimizer is not None:
            self.anchor = [p.detach().clone() for p in self._zo_params()]
        if self.schedule == "sequential" and not self.holds_turn:
            self.wire.send("await_turn")
            self._apply(self._receive("turn", "our turn", wait_s))
            self.holds_turn, self.steps = True, 0

    def after_step(self, update: ZOUpdate | None, wait_s: float) -> None:
        if update is not None and self.client_sync == "seeds":
            self.pending.append(update)
        self.steps += 1
        if self.schedule == "sequential" and self.steps == self.steps_per_turn:
            tensors, fields = self._payload()
            self.wire.send("handoff", tensors, **fields)
            self.pending, self.holds_turn = [], False
        elif self.schedule == "parallel" and self.steps == self.sync_every_n_steps:
            self._sync(wait_s)

    def _sync(self, wait_s: float) -> None:
        tensors, fields = self._payload()
        self.wire.send("sync", tensors, **fields)
        self._apply(self._receive("synced", "the other clients' updates", wait_s), averaged=True)
        self.pending, self.steps = [], 0

    def finish(self, wait_s: float) -> None:
        """At the end of training: a last round (parallel), then everyone's remaining progress."""
        if self.schedule == "parallel" and self.steps:
            self._sync(wait_s)
        # only the turn's holder has progress the others lack (parallel clients are even after the last round)
        tensors, fields = self._payload() if self.holds_turn else (None, {"updates": []})
        self.wire.send("finish", tensors, **fields)
        self._apply(self._receive("final", "the other clients to finish", wait_s))
        self.pending, self.holds_turn = [], False
