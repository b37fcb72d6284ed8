"""Each client's own share of a training split, so that several clients read one dataset without per-rank paths.

Every client draws the same partition from the DataModule's ``seed`` and keeps the shard of its own index, so the
shards are disjoint and together cover the split, and no process needs to talk to another to get its own:

- ``"none"``: every client reads the whole split (the default);
- ``"iid"``: a seeded shuffle cut into ``num_clients`` shards of equal size (within one example);
- ``"dirichlet"``: label skew, as split-federated studies of non-IID clients draw it (Hsu et al., 2019): each class's
  examples are divided among the clients in proportions drawn from Dirichlet(``alpha``); a small ``alpha`` gives
  each client few classes, a large one approaches ``"iid"``. Needs class labels (a classification DataModule).

A client's index and the number of clients default to what ``torchrun`` sets for a distributed run
(``HOSLStrategy(transport="distributed")``: rank 0 is the server, ranks 1..N the clients, so the client index is
``RANK - 1`` of ``WORLD_SIZE - 1``); they are read when the split is drawn, so the server process never needs them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hosl_lightning.core.options import UserError, check_choice, check_int, check_number

PARTITIONS: tuple[str, ...] = ("none", "iid", "dirichlet")
DEFAULT_ALPHA = 0.5
_DRAWS = 100  # Dirichlet draws tried before giving up on one that leaves no client empty


@dataclass(frozen=True)
class Partition:
    """How a training split is shared among clients (see the module docstring); checked when built."""

    scheme: str = "none"
    alpha: float | None = None
    client_index: int | None = None
    num_clients: int | None = None

    def __post_init__(self) -> None:
        check_choice("partition", self.scheme, PARTITIONS)
        if self.alpha is not None:
            if self.scheme != "dirichlet":
                raise UserError(f"alpha={self.alpha!r} is not valid with partition={self.scheme!r}, which does not "
                                 "use it: remove alpha, or use partition='dirichlet'")
            check_number("alpha", self.alpha, 0, strict=True)
        for name in ("client_index", "num_clients"):
            value = getattr(self, name)
            if value is not None and self.scheme == "none":
                raise UserError(f"{name}={value!r} is not valid with partition='none', which gives every client the "
                                 "whole split: remove it, or choose partition 'iid' or 'dirichlet'")
        check_int("num_clients", self.num_clients, 1, none="WORLD_SIZE - 1, as torchrun sets it")
        check_int("client_index", self.client_index, 0, none="RANK - 1, as torchrun sets it")
        if None not in (self.client_index, self.num_clients) and self.client_index >= self.num_clients:  # type: ignore[operator]
            raise UserError(f"client_index={self.client_index} is not valid: it must be below num_clients="
                             f"{self.num_clients} (clients are numbered 0..{self.num_clients - 1})")  # type: ignore[operator]

    def client(self) -> tuple[int, int]:
        """(this client's index, the number of clients), as given or from torchrun's RANK and WORLD_SIZE."""
        index, clients = self.client_index, self.num_clients
        if index is None or clients is None:
            rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
            if rank is None or world is None or int(rank) < 1 or int(world) < 2:
                raise UserError(
                    f"partition={self.scheme!r} needs this client's index and the number of clients: set client_index "
                    "and num_clients, or run it as a client of a distributed run (torchrun sets RANK >= 1 and "
                    f"WORLD_SIZE; here RANK={rank!r}, WORLD_SIZE={world!r})")
            index = int(rank) - 1 if index is None else index
            clients = int(world) - 1 if clients is None else clients
            Partition(self.scheme, self.alpha, index, clients)  # the combined values, checked
        return index, clients

    def shard(self, indices: Sequence[int], classes: Sequence[int] | None, seed: int, where: str) -> list[int]:
        """This client's share of ``indices`` (kept in their order); ``classes[i]``: the class of example ``i``."""
        if self.scheme == "none":
            return list(indices)
        index, clients = self.client()
        if self.scheme == "iid":
            order = np.random.RandomState(seed).permutation(len(indices))
            mine = {indices[i] for i in np.array_split(order, clients)[index]}
        else:
            if classes is None:
                raise UserError(f"partition='dirichlet' is not valid for {where}: it divides each class among the "
                                 "clients and these examples have no class; use partition='iid'")
            mine = set(dirichlet_shards(indices, classes, clients, self.alpha or DEFAULT_ALPHA, seed, where)[index])
        return [i for i in indices if i in mine]


def dirichlet_shards(indices: Sequence[int], classes: Sequence[int], clients: int, alpha: float, seed: int,
                     where: str) -> list[list[int]]:
    """Every client's examples: each class divided in proportions drawn from Dirichlet(alpha); no client empty."""
    rng = np.random.RandomState(seed)
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(classes[i], []).append(i)
    for _ in range(_DRAWS):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for label in sorted(by_class):
            members = np.array(by_class[label])[rng.permutation(len(by_class[label]))]
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(members, cuts), strict=True):
                shard.extend(part.tolist())
        if all(shards):
            return shards
    raise UserError(f"partition='dirichlet' with alpha={alpha} left a client of {clients} without examples of "
                     f"{where} ({len(indices)} examples) in {_DRAWS} draws: raise alpha, or use fewer clients")
