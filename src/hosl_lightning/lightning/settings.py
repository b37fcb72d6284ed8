"""The options of a split run, their checks, and what they mean for this process (its role and peers).

:class:`RunSettings` is the part of :class:`~hosl_lightning.lightning.strategy.HOSLStrategy` that knows the
options: each is checked when the strategy is built, with the option, the value and the valid ones named.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

from hosl_lightning.core.options import check_choice, check_int, check_number
from hosl_lightning.core.zo import DIRECTIONS, ZOSGD
from hosl_lightning.distributed.clients import ClientSync
from hosl_lightning.distributed.peers import BACKENDS, Peers
from hosl_lightning.distributed.sync import CLIENT_SYNCS, SCHEDULES, check_replayable
from hosl_lightning.distributed.wire import Wire, WireError
from hosl_lightning.models import adapter_config
from hosl_lightning.modes import MODES, SERVER_GRADS, ModeName, ServerGrad, ZOSettings

STRATEGY_NAME = "hosl"
TRANSPORTS: tuple[str, ...] = ("in_process", "distributed")


class RunSettings:
    """Options and process roles; mixed into HOSLStrategy (see its docstring for every option)."""

    def _init_settings(
        self,
        cut_layer: int = 1,
        mode: ModeName = "hosl",
        q: int = 1,
        mu: float = 1e-3,
        zo_lr: float = 1e-6,
        zo_weight_decay: float = 0.0,
        direction: str = "gaussian",
        seed: int = 0,
        server_grad: ServerGrad | None = None,
        batch_probes: bool | None = None,
        client_device: str | None = None,
        server_device: str | None = None,
        memory_every_n_steps: int = 50,
        transport: str = "in_process",
        backend: str | None = None,
        timeout_s: float = 300.0,
        init_method: str = "env://",
        rank: int | None = None,
        world_size: int | None = None,
        schedule: str = "sequential",
        client_sync: str = "seeds",
        steps_per_turn: int = 10,
        sync_every_n_steps: int = 10,
        server_checkpoint_dir: str = "server_checkpoints",
        client_adapter: dict[str, Any] | None = None,
        server_adapter: dict[str, Any] | None = None,
    ) -> None:
        check_int("cut_layer", cut_layer, 0)
        check_choice("mode", mode, tuple(MODES))
        check_int("q", q, 1)
        check_number("mu", mu, 0, strict=True)
        check_number("zo_lr", zo_lr, 0)
        check_number("zo_weight_decay", zo_weight_decay, 0)
        check_choice("direction", direction, DIRECTIONS)
        check_int("seed", seed, 0)
        if server_grad is not None:
            check_choice("server_grad", server_grad, SERVER_GRADS)
        check_int("memory_every_n_steps", memory_every_n_steps, 0)
        check_choice("transport", transport, TRANSPORTS)
        if backend is not None:
            check_choice("backend", backend, BACKENDS)
        check_number("timeout_s", timeout_s, 0, strict=True)
        if rank is not None:
            check_int("rank", rank, 0)
        if world_size is not None:
            check_int("world_size", world_size, 2)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("client_sync", client_sync, CLIENT_SYNCS)
        check_int("steps_per_turn", steps_per_turn, 1)
        check_int("sync_every_n_steps", sync_every_n_steps, 1)
        if transport == "distributed" and (client_adapter is not None or server_adapter is not None):
            raise ValueError("client_adapter / server_adapter run in-process only for now: use transport='in_process'")
        for side, spec in (("client", client_adapter), ("server", server_adapter)):
            if spec is not None:
                adapter_config(spec, side)  # a bad field fails now, not when training starts
        self.client_adapter, self.server_adapter = client_adapter, server_adapter
        self.cut_layer, self.mode = cut_layer, mode
        # None: the path's own choice (a drop-in module takes its gradient from the clean call it makes anyway).
        self._given = {"server_grad": server_grad, "batch_probes": batch_probes}
        self.settings = ZOSettings(queries=q, mu=float(mu), server_grad=server_grad or "perturbed",
                                   batch_probes=True if batch_probes is None else batch_probes)
        self.zo_lr, self.zo_weight_decay = float(zo_lr), float(zo_weight_decay)
        self.direction, self.seed = direction, seed
        self._client_device = None if client_device is None else torch.device(client_device)
        self._server_device = None if server_device is None else torch.device(server_device)
        self.memory_every_n_steps = memory_every_n_steps
        self.transport = transport
        self._peers = Peers(backend, float(timeout_s), init_method, rank, world_size)
        self.schedule, self.client_sync = schedule, client_sync
        self.steps_per_turn, self.sync_every_n_steps = steps_per_turn, sync_every_n_steps
        self.server_checkpoint_dir = server_checkpoint_dir
        self.clients = 1  # client processes in a distributed run (world size - 1)
        self._client_sync: ClientSync | None = None
        self.client_optimizer: ZOSGD | None = None

    # ---- processes -------------------------------------------------------------------------------------
    @property
    def role(self) -> str:
        """``"both"`` in-process; in a distributed run ``"server"`` (rank 0) or ``"client"``."""
        if self.transport == "in_process":
            return "both"
        return self._peers.role

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
            half = self.split_model.client  # type: ignore[attr-defined]
            self._client_sync = ClientSync(self._wire, half, self.client_optimizer, self.schedule,
                                           self.client_sync, self.steps_per_turn, self.sync_every_n_steps)
            if self.client_optimizer is not None and self.client_sync == "seeds":
                check_replayable(self.client_optimizer)

    def hello_settings(self, client_zo_params: int) -> dict[str, Any]:
        """What client and server must agree on; the server refuses a hello that differs, naming each setting."""
        return {
            "cut_layer": self.cut_layer, "seed": self.seed, "direction": self.direction, "q": self.settings.queries,
            "mu": self.settings.mu, "server_grad": self.settings.server_grad, "client_zo_params": client_zo_params,
            "clients": self.clients, "schedule": self.schedule, "client_sync": self.client_sync,
            "zo_lr": self.zo_lr, "zo_weight_decay": self.zo_weight_decay,
            "steps_per_turn": self.steps_per_turn, "sync_every_n_steps": self.sync_every_n_steps,
        }

    def report_failure(self, exception: BaseException) -> None:
        """A failing client tells the server why, instead of vanishing mid-protocol."""
        if self.role == "client" and self._wire is not None:
            try:
                self._wire.send("error", wait=False, message=f"{type(exception).__name__}: {exception}")
            except Exception:  # noqa: BLE001, S110 - the server is gone: the original error is the one to report
                pass

    def close_peers(self, failure: BaseException | None, say_bye: Any) -> None:
        """End a client's session: finish the clients' sync, say bye (or flush the error sent), disconnect."""
        if self.role != "client" or self._wire is None:
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

    # ---- the drop-in path --------------------------------------------------------------------------------
    def check_dropin(self) -> None:
        """A drop-in module's step is opaque: refuse the options it cannot honour, naming why."""
        if self.mode != "hosl":
            return
        server_grad, batch_probes = self._given["server_grad"], self._given["batch_probes"]
        if server_grad not in (None, "clean"):
            raise ValueError(
                f"server_grad={server_grad!r} is not valid with a drop-in module (automatic optimization): its "
                "training_step runs once more, unperturbed, for the loss it logs, and the server's gradient comes "
                "from that call; use server_grad='clean' (or leave it unset), or train with hosl_lightning.HOSLModule"
            )
        if batch_probes:
            raise ValueError(
                "batch_probes=True is not valid with a drop-in module (automatic optimization): each probe is a call "
                "of its own training_step, which cannot be batched; leave batch_probes unset (or False), or train "
                "with hosl_lightning.HOSLModule"
            )

    def dropin_settings(self) -> ZOSettings:
        return ZOSettings(self.settings.queries, self.settings.mu, "clean", batch_probes=False)


def check_precision(plugin: Precision, mode: str, transport: str) -> None:
    """Refuse precisions that would break zeroth-order updates or a distributed run, before anything loads."""
    if transport == "distributed" and plugin.precision != "32-true":
        raise ValueError(
            f"precision={plugin.precision!r}: a distributed run computes in float32 on both sides (the server "
            "has no precision plugin), so use precision '32-true' or transport='in_process'"
        )
    if mode != "fo" and isinstance(plugin, HalfPrecision):
        raise ValueError(
            f"precision={plugin.precision!r} stores weights in half precision, but mode={mode!r} updates "
            "client weights by zeroth-order steps, which need float32: use precision '32-true' or 'bf16-mixed'"
        )
    if mode == "zo" and isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise ValueError(
            "precision='16-mixed' uses a GradScaler, which must never touch zeroth-order updates, and "
            "mode='zo' trains only by them: use precision '32-true' or 'bf16-mixed'"
        )
