"""Keeping several clients' halves in step: by exchanging ZO updates as (seed, step, lr, coefficients), or weights.

A zeroth-order client's update of a whole step is ``-lr * (1/Q) sum_q c_q u(seed, step, q)``: a few numbers,
since every direction ``u`` is regenerated from its seed. Another client holding the same weights replays
those numbers and gets the same weights, bit for bit, without a single weight crossing the wire. Weight
decay would make the update depend on the weights themselves, so seed synchronisation requires none.

- Sequential split learning: the client whose turn ends hands its updates on; the next replays them.
- Split-federated learning: every k steps each client sends its updates, and every client moves to the
  average ``theta_0 + (1/N) sum_i Delta_i`` by going back to the round's start ``theta_0`` (a copy it keeps) and
  replaying everyone's updates, scaled by 1/N, in the one order the server sends: the same operations on the
  same numbers, so the clients agree bit for bit (undoing its own updates by replaying them at scale -1 would
  leave each client its own rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hosl_lightning.core.zo import ZOSGD, DirectionSampler, ZOEstimate, mix_seed
from hosl_lightning.distributed.wire import MalformedPayload

SCHEDULES: tuple[str, ...] = ("sequential", "parallel")
CLIENT_SYNCS: tuple[str, ...] = ("seeds", "weights")


def client_seed(seed: int, rank: int, clients: int) -> int:
    """Each client draws its own directions; a single client keeps the run's seed (same as in-process)."""
    return seed if clients == 1 else mix_seed(seed, rank)


@dataclass(frozen=True)
class ZOUpdate:
    """One applied ZO step, as it travels: JSON numbers (exact for float64 and the float32 coefficients), and
    for each sparse direction the row ids it covered (``{key: [rows]}``; empty with dense directions)."""

    seed: int
    step: int
    lr: float
    coefficients: tuple[float, ...]
    rows: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, optimizer: ZOSGD, estimate: ZOEstimate) -> ZOUpdate:
        """The update ``optimizer`` just applied from ``estimate``."""
        rows = {key: tuple(ids.tolist()) for key, ids in estimate.rows.items()}
        return cls(optimizer.sampler.seed, estimate.step, optimizer.param_groups[0]["lr"],
                   tuple(estimate.coefficients.tolist()), rows)

    def to_json(self) -> list:
        item: list = [self.seed, self.step, self.lr, list(self.coefficients)]
        return [*item, {str(k): list(v) for k, v in self.rows.items()}] if self.rows else item

    @classmethod
    def from_json(cls, item: list) -> ZOUpdate:
        """Parse and check one update from a peer: replaying NaN or inf would corrupt every weight it touches."""
        try:
            seed, step, lr, coefficients, *more = item
            rows = {int(k): tuple(int(r) for r in v) for k, v in (more[0] if more else {}).items()}
            update = cls(int(seed), int(step), float(lr), tuple(float(c) for c in coefficients), rows)
        except (TypeError, ValueError, AttributeError) as error:
            raise MalformedPayload(f"an update must be [seed, step, lr, [coefficients], {{key: [rows]}}?], got "
                                   f"{item!r}: {error}") from None
        if not all(math.isfinite(v) for v in (update.lr, *update.coefficients)) or not update.coefficients:
            raise MalformedPayload(f"an update holds NaN, inf or no coefficients: {item!r}")
        if any(list(rows) != sorted(set(rows)) or (rows and rows[0] < 0) for rows in update.rows.values()):
            raise MalformedPayload(f"an update's rows must be sorted, distinct and >= 0: {item!r}")
        return update


def encoded_size(updates: Sequence[ZOUpdate]) -> int:
    """Bytes the updates take in a message header."""
    return len(json.dumps([u.to_json() for u in updates]).encode())


def check_stateless(optimizer: type[ZOSGD] | ZOSGD) -> None:
    """Seed sync replays an update from its numbers alone: an optimizer with state cannot be replayed so."""
    if not optimizer.replayable:
        raise ValueError(
            f"client_sync='seeds' is not valid with zo_optimizer {optimizer.name!r}: it keeps state that an update's "
            "numbers do not carry; use client_sync='weights' or a stateless zo_optimizer (zo_sgd, fzoo)"
        )


def check_replayable(optimizer: ZOSGD) -> None:
    check_stateless(optimizer)
    if any(group["weight_decay"] for group in optimizer.param_groups):
        raise ValueError(
            "client_sync='seeds' replays updates from their seeds, which is exact only without weight decay: set "
            "zo_weight_decay=0 or use client_sync='weights'"
        )


@torch.no_grad()
def replay(optimizer: ZOSGD, updates: Sequence[ZOUpdate], scale: float = 1.0) -> None:
    """Apply ``updates`` (made by any client) to ``optimizer``'s parameters, each scaled by ``scale``."""
    check_replayable(optimizer)
    samplers: dict[int, DirectionSampler] = {}
    own = optimizer.sampler
    for update in updates:
        sampler = samplers.setdefault(update.seed, DirectionSampler(own.kind, update.seed, own.chunk))
        for group in optimizer.param_groups:
            for param in group["params"]:
                rows = update.rows.get(optimizer.keys[id(param)])
                if rows and rows[-1] >= param.shape[0]:
                    raise MalformedPayload(f"an update moves row {rows[-1]} of {optimizer.names[id(param)]!r}, which "
                                           f"has {param.shape[0]} rows")
                optimizer.add_directions(param, sampler, update.step, list(update.coefficients), update.lr, scale,
                                         rows=None if rows is None else torch.tensor(rows, dtype=torch.long))


def weights_of(module: nn.Module) -> dict[str, Tensor]:
    """The floating-point state of a half, for weight synchronisation."""
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def weight_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weights_digest(module: nn.Module) -> str:
    """A fingerprint of a module's weights: clients that sync by seeds must start from the same ones, and a
    subset selection computed for some weights is reused only for the very same weights."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
