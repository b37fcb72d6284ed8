"""This process's part in a split run: its role, its peers, and the sync between several client processes.

:class:`SplitProcesses` is the part of :class:`~hosl_lightning.lightning.strategy.HOSLStrategy` that knows who this
process is and who is on the other end: a distributed run's peers (:class:`~hosl_lightning.distributed.peers.Peers`),
the checks that depend on how many clients joined, the clients' sync, the hello both sides must agree on, and the ZO
optimizer each process draws with (each client of several its own seed). Kept apart from the options
(:mod:`.settings`): those are checked when the strategy is built, before any process is known.
"""

from __future__ import annotations

from typing import Any

from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.distributed.clients import ClientSync
from hosl_lightning.distributed.peers import Peers
from hosl_lightning.distributed.sync import check_replayable, client_seed
from hosl_lightning.distributed.wire import Wire, WireError
from hosl_lightning.lightning.precision_checks import check_zo_dtype
from hosl_lightning.modes import ZOSettings
from hosl_lightning.zo_optimizers import build_zo_optimizer


class SplitProcesses:
    """This process's role and peers, and the clients' sync. The strategy provides the checked options
    (:class:`~.settings.RunSettings`), ``split_model`` and ``client_optimizer``."""

    transport: str
    mode: str
    cut_layer: int
    settings: ZOSettings
    seed: int
    direction: str
    zo_optimizer: dict[str, Any]
    zo_lr: float
    zo_weight_decay: float
    zo_lr_schedule: str
    embedding_directions: str
    client_frozen: list[str] | None
    schedule: str
    client_sync: str
    steps_per_turn: int
    sync_every_n_steps: int
    split_model: Any
    client_optimizer: ZOSGD | None

    def _init_processes(self, backend: str | None, timeout_s: float, init_method: str, rank: int | None,
                        world_size: int | None) -> None:
        """This process's peers, from the options already checked; no process is joined until :meth:`_connect`."""
        self._peers = Peers(backend, float(timeout_s), init_method, rank, world_size)
        self.clients = 1  # client processes in a distributed run (world size - 1)
        self._client_sync: ClientSync | None = None

    @property
    def role(self) -> str:
        """``"both"`` in-process; in a distributed run ``"server"`` (rank 0) or ``"client"``."""
        if self.transport == "in_process":
            return "both"
        return self._peers.role

    @property
    def sync_bytes(self) -> tuple[int, int] | None:
        """``(bytes up, bytes down)`` this client process spent on ``client_sync``, the final hand-off included (the
        logged ``sync_bytes_up`` / ``_down`` miss it); None with nothing to sync (in-process, server, one client)."""
        return None if (sync := self._client_sync) is None else (sync.bytes_up, sync.bytes_down)

    @property
    def backend(self) -> str | None:
        return self._peers.backend

    @property
    def timeout_s(self) -> float:
        return self._peers.timeout_s

    @property
    def init_method(self) -> str:
        return self._peers.init_method

    def _connect(self) -> Wire:
        """Join the run's processes (checking the settings against how many clients there are) and link to them."""
        return self._peers.connect(self._accept_clients)

    @property
    def _wire(self) -> Wire | None:
        return self._peers.wire

    def _accept_clients(self, clients: int) -> None:
        """Record how many clients the run has; refuse the settings that cannot work with that many."""
        self.clients = clients
        if clients == 1:
            return
        if self.mode == "zo":
            raise ValueError("several clients train in modes 'hosl' and 'fo'; mode='zo' runs with one client")
        if self.mode == "fo" and self.client_sync == "seeds":
            raise ValueError(
                "client_sync='seeds' replays zeroth-order updates from their seeds, but mode='fo' updates the client "
                "by gradients: use client_sync='weights'"
            )
        if self.backend == "nccl":
            raise ValueError("several clients need backend='gloo': the server receives from whichever client sends first")

    def wait_for_others_s(self) -> float:
        """How long a client may wait for the others: every step they may take before it is its go."""
        return self.timeout_s * (max(self.steps_per_turn, self.sync_every_n_steps) * self.clients + 1)

    def _start_client_sync(self) -> None:
        if self.clients > 1:
            assert self._wire is not None
            half = self.split_model.client
            self._client_sync = ClientSync(self._wire, half, self.client_optimizer, self.schedule,
                                           self.client_sync, self.steps_per_turn, self.sync_every_n_steps)
            if self.client_optimizer is not None and self.client_sync == "seeds":
                check_replayable(self.client_optimizer)

    def zo_optimizer_over(self, *halves: Any, dtype: str | None = None) -> ZOSGD:
        """The ``zo_optimizer`` over the ZO parameters of ``halves``; each client of several draws its own seed.
        ``dtype``: the module's ``dtype`` option, named when the weights it loaded cannot take ZO steps."""
        seed = self.seed if self.role != "client" else client_seed(self.seed, self._peers.rank(), self.clients)
        named = [(n, p) for half in halves for n, p in half.named_parameters() if getattr(p, "_hosl_zo", False)]
        check_zo_dtype(named, self.mode, dtype)
        if not named and self.client_frozen:
            raise ValueError(f"client_frozen={self.client_frozen} freezes every weight of the client half, leaving the "
                             f"zeroth-order optimizer nothing to train: freeze fewer modules, or set zo_lr: 0 to keep "
                             f"the client fixed while it still probes")
        return self.new_zo_optimizer(named, seed)

    def new_zo_optimizer(self, named: list[tuple[str, Any]], seed: int, first_key: int = 0) -> ZOSGD:
        """The run's ``zo_optimizer`` over ``named`` (this process's ZO parameters), drawing from ``seed``."""
        return build_zo_optimizer(self.zo_optimizer, named, lr=self.zo_lr, weight_decay=self.zo_weight_decay,
                                  direction=self.direction, seed=seed, first_key=first_key,
                                  embedding_directions=self.embedding_directions)

    def hello_settings(self, client_zo_params: int) -> dict[str, Any]:
        """What client and server must agree on; the server refuses a hello that differs, naming each setting."""
        return {
            "cut_layer": self.cut_layer, "seed": self.seed, "direction": self.direction, "q": self.settings.queries,
            "mu": self.settings.mu, "server_grad": self.settings.server_grad, "client_zo_params": client_zo_params,
            "clients": self.clients, "schedule": self.schedule, "client_sync": self.client_sync,
            "zo_lr": self.zo_lr, "zo_weight_decay": self.zo_weight_decay, "zo_lr_schedule": self.zo_lr_schedule,
            "steps_per_turn": self.steps_per_turn, "sync_every_n_steps": self.sync_every_n_steps,
            "zo_optimizer": self.zo_optimizer, "embedding_directions": self.embedding_directions,
        }

    def report_failure(self, exception: BaseException) -> None:
        """A failing client tells the server why, instead of vanishing mid-protocol."""
        if self._wire is not None and self.role == "client":  # no link: no role asked of an unlaunched process
            try:
                self._wire.send("error", wait=False, message=f"{type(exception).__name__}: {exception}")
            except Exception:  # noqa: BLE001, S110 - the server is gone: the original error is the one to report
                pass

    def close_peers(self, failure: BaseException | None, say_bye: Any) -> None:
        """End a client's session: finish the clients' sync, say bye (or flush the error sent), disconnect."""
        if self._wire is None or self.role != "client":
            return
        try:
            if failure is None:
                if self._client_sync is not None:
                    self._client_sync.finish(self.wait_for_others_s())
                if say_bye is not None:
                    say_bye()
            else:
                self._wire.flush()  # the error message sent by report_failure
        except WireError:
            if failure is None:
                raise
        finally:
            self._peers.disconnect()

