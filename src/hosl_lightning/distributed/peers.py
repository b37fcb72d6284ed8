"""Peers: how one process of a distributed HOSL run finds the others and holds its links to them.

Rank 0 is the server; ranks 1..world_size-1 are clients. Kept apart from :class:`HOSLStrategy` so that the
strategy says *what* a step does, and this says *who* is on the other end and how long to wait for them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment

from hosl_lightning.distributed.environment import SplitEnvironment
from hosl_lightning.distributed.joining import JOIN_GRACE_S, PeerUnreachable, join_process_group
from hosl_lightning.distributed.wire import Wire

BACKENDS: tuple[str, ...] = ("gloo", "nccl")
SERVER_RANK = 0  # in a multi-process run rank 0 is the server and ranks 1.. the clients
__all__ = ["BACKENDS", "JOIN_GRACE_S", "SERVER_RANK", "PeerUnreachable", "Peers"]


class Peers:
    """This process's rank and role, the process group it joins, and its :class:`Wire` links.

    Rank and world size come from ``environment`` (by default a :class:`SplitEnvironment` over ``rank`` and
    ``world_size``, else the ``RANK`` / ``WORLD_SIZE`` variables that ``torchrun`` sets); the group is joined on
    the first :meth:`connect` (unless the launcher already joined it) and left by :meth:`disconnect` only if
    this object joined it.
    """

    def __init__(self, backend: str | None, timeout_s: float, init_method: str, rank: int | None = None,
                 world_size: int | None = None, environment: ClusterEnvironment | None = None) -> None:
        self.backend, self.timeout_s, self.init_method = backend, timeout_s, init_method
        self.environment = environment or SplitEnvironment(rank, world_size, init_method)
        self.wire: Wire | None = None  # a client's link to the server; the server's link to client 1
        self.client_wires: dict[int, Wire] = {}  # the server's links, by client rank
        self._owns_process_group = False

    def rank(self) -> int:
        return self.environment.global_rank()

    def check_launched(self) -> None:
        """Refuse a process started without its rank, the world size or where to meet, before it loads anything
        (what :class:`SplitEnvironment` needs; another cluster environment checks its own)."""
        check = getattr(self.environment, "check_launched", None)
        if check is not None:
            check()

    @property
    def role(self) -> str:
        return "server" if self.rank() == SERVER_RANK else "client"

    def clients(self) -> int:
        """How many client processes the run has (world size - 1); checks rank and world size."""
        rank = self.rank()
        world_size = self.environment.world_size()
        if world_size < 2:
            raise ValueError(
                f"world_size={world_size}: a distributed HOSL run has the server (rank 0) and at least one client"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not valid: choose 0 (the server) or 1..{world_size - 1} (the clients)")
        return world_size - 1

    def connect(self, check_clients: Callable[[int], None] = lambda clients: None) -> Wire:
        """Join the process group (unless the launcher already did) and open the links to the peers.

        ``check_clients(n)`` runs before joining, so a setting that cannot work with ``n`` clients fails at
        once instead of after every process has started.
        """
        if self.wire is not None:
            return self.wire
        rank, clients = self.rank(), self.clients()
        check_clients(clients)
        if not dist.is_initialized():
            backend = self.backend or "gloo"  # both sides must agree; NCCL is opt-in (one client, GPUs both sides)
            # Joining waits for every process to start (imports and loading can take a while on a busy machine),
            # at most join_bound_s(timeout_s), then fails with PeerUnreachable naming the peer and the address;
            # once joined, every receive has its own deadline of timeout_s (wire.Wire).
            join_process_group(backend, self.init_method, rank, clients + 1, self.timeout_s)
            self._owns_process_group = True
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        if rank == SERVER_RANK:
            self.client_wires = {r: Wire(r, f"client (rank {r})", self.timeout_s, device) for r in range(1, clients + 1)}
            self.wire = self.client_wires[1]
        else:
            self.wire = Wire(SERVER_RANK, f"server (rank {SERVER_RANK})", self.timeout_s, device)
        return self.wire

    def disconnect(self) -> None:
        self.wire = None
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_process_group = False
