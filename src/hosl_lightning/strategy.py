"""HOSLStrategy: cut the model, place the halves, and dispatch each step to the hosl, fo or zo algorithm.

The strategy owns everything that makes training *split*: it finds the Hugging Face causal LM inside any
LightningModule, replaces it with a :class:`SplitCausalLM`, decides which parameters learn by gradients
and which by zeroth-order estimates, holds the client's ZO optimizer and its seed counter, and saves both
in checkpoints. Modules written for plain fine-tuning (automatic optimization) train unchanged: their own
``training_step`` becomes the loss oracle of the ZO probes. :class:`~hosl_lightning.module.HOSLModule`
(manual optimization) calls :meth:`HOSLStrategy.run_step` for the fast path with batched server probes.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import PreTrainedModel

from hosl_lightning.adapters import adapter_config, add_adapters, untied_head_trainable
from hosl_lightning.clients import ClientSync
from hosl_lightning.memory import MemoryReport, SideSwitch, StepMemoryMeter
from hosl_lightning.model import SplitCausalLM
from hosl_lightning.models import materialize_half
from hosl_lightning.options import check_choice, check_int, check_number
from hosl_lightning.peers import BACKENDS, SERVER_RANK, Peers
from hosl_lightning.remote import (
    ClientSplitCausalLM,
    RemoteServer,
    SplitServer,
    client_fo_step,
    client_hosl_step,
    client_zo_step,
)
from hosl_lightning.split import split_causal_lm
from hosl_lightning.steps import (
    MODES,
    SERVER_GRADS,
    Mode,
    ServerGrad,
    StepOutput,
    ZOSettings,
    eval_mode,
    fo_step,
    hosl_step,
    zo_step,
)
from hosl_lightning.sync import (
    CLIENT_SYNCS,
    SCHEDULES,
    ZOUpdate,
    check_replayable,
    client_seed,
    weights_digest,
)
from hosl_lightning.wire import Wire, WireError
from hosl_lightning.zo import DIRECTIONS, ZOSGD, ZOEstimate, two_point_estimate

STRATEGY_NAME = "hosl"
TRANSPORTS: tuple[str, ...] = ("in_process", "distributed")


def find_causal_lm(module: nn.Module) -> tuple[str, nn.Module]:
    """The (dotted name, module) of the one HF causal LM (or already split model) inside ``module``."""
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, (SplitCausalLM, PreTrainedModel))]
    outermost = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n and o)]
    if not outermost:
        raise ValueError(
            f"HOSLStrategy found no Hugging Face model inside {type(module).__name__}: assign the causal LM as an "
            "attribute of your LightningModule, e.g. self.model = AutoModelForCausalLM.from_pretrained(...)"
        )
    if len(outermost) > 1:
        names = ", ".join(n or "<module>" for n, _ in outermost)
        raise ValueError(f"HOSLStrategy found several Hugging Face models ({names}); it can split exactly one")
    return outermost[0]


@contextmanager
def _silenced_logging(module: LightningModule) -> Iterator[None]:
    """Probe forwards call the user's training_step; its self.log calls must count once per step, not 2Q+1 times."""
    module.log, module.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


def _loss_of(output: STEP_OUTPUT) -> Tensor:
    loss = output["loss"] if isinstance(output, dict) else output
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError("under HOSLStrategy, training_step must return a scalar loss tensor or a dict with 'loss'")
    return loss.detach().reshape(())


def _pop_loss_weight(args: tuple[Any, ...]) -> Tensor | None:
    """A weighted subset's batch weight (``hosl_lightning.subsets``), taken out before a user's training_step sees it."""
    batch = args[0] if args else None
    return batch.pop("loss_weight", None) if isinstance(batch, dict) else None


def _scaled(output: STEP_OUTPUT, weight: Tensor | None) -> STEP_OUTPUT:
    if weight is None:
        return output
    if isinstance(output, dict):
        return {**output, "loss": output["loss"] * weight.to(output["loss"].device)}
    assert isinstance(output, Tensor)
    return output * weight.to(output.device)


class HOSLStrategy(SingleDeviceStrategy):
    """Hybrid-order split learning: zeroth-order client, first-order server, cut at ``cut_layer``.

    Args:
        cut_layer: the client runs the embeddings and decoder blocks ``[0, cut_layer)``; the server the rest.
        mode: ``"hosl"`` (ZO client, FO server), ``"fo"`` (first-order split learning baseline: the server
            returns dL/dh) or ``"zo"`` (both halves zeroth-order with one shared seed, MeZO over the split model).
        q: number of random directions (queries) per step; each costs two client forwards.
        mu: smoothing radius of the two-point estimate.
        zo_lr: learning rate of the zeroth-order updates (the client in hosl mode, both halves in zo mode).
        zo_weight_decay: decoupled weight decay of the ZO updates; biases and norm weights are exempt.
        direction: ``"gaussian"`` or ``"rademacher"`` directions.
        seed: base seed of the directions; direction q of step t is drawn from hash(seed, t, q, tensor).
        server_grad: which forward the server's gradient comes from in hosl mode: ``"perturbed"`` (the +mu
            point of query 1, free: the authors' choice), ``"mean"`` (all 2Q points) or ``"clean"``
            (unperturbed client weights; one more client forward).
        batch_probes: compute the 2Q server losses in one batched forward (faster) instead of one at a time.
        client_device / server_device: where each half lives (e.g. ``"cpu"`` and ``"cuda:0"`` to emulate an
            edge device beside a server); by default the Trainer's device.
        memory_every_n_steps: measure each side's memory (peak, parameters, gradients, optimizer state,
            activations) on the first two steps of a fit and then on every step whose index is a multiple of
            n; 0 turns it off. A measured step is slower (on CPU, torch's MemTracker sees every tensor);
            other steps pay nothing. The latest :class:`~hosl_lightning.memory.MemoryReport` is
            ``strategy.memory_report`` and is logged on every step under ``hosl/memory/`` (see
            :mod:`hosl_lightning.memory` for what is measured how on CPU and CUDA).
        transport: ``"in_process"`` (both halves in this process, the default) or ``"distributed"``: client and
            server in separate processes that talk over ``torch.distributed``; rank 0 is the server, rank 1 the
            client, and each process builds and holds only its own half (see README, "Client and server in
            separate processes").
        backend: the ``torch.distributed`` backend of a distributed run: ``"gloo"`` (the default, on both sides) or
            ``"nccl"`` (one client, GPUs on both sides; untested without a GPU).
        timeout_s: in a distributed run, how long either side waits for the other before failing with an
            error that names the peer and what was awaited.
        init_method / rank / world_size: how the processes find each other; by default ``"env://"`` and the
            ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables that ``torchrun`` sets.
            Rank 0 is the server; ranks 1..world_size-1 are clients, each with its own data.
        schedule: with several clients, ``"sequential"`` (they take turns of ``steps_per_turn`` steps, the client
            half passing from one to the next: sequential split learning) or ``"parallel"`` (they train at the
            same time and their halves are averaged every ``sync_every_n_steps`` steps: split-federated learning).
        client_sync: how client halves are kept in step: ``"seeds"`` (the ZO updates travel as (seed, step, lr,
            coefficients) and are replayed: bytes instead of megabytes; needs zo_weight_decay=0) or ``"weights"``
            (the half's weights; the only choice in ``fo`` mode).
        steps_per_turn / sync_every_n_steps: the length of a turn (sequential) and of a round (parallel).
        server_checkpoint_dir: where the server keeps its half of each client checkpoint (``<name>.server.pt``, on
            the server's disk); a client names only the file, never a path, so no peer can write elsewhere.
        client_adapter / server_adapter: peft adapters on that side's decoder blocks, as a dict of
            ``peft.LoraConfig`` fields (e.g. ``{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}``; add
            ``peft_type`` for another method) or a peft config. A side with adapters trains only them (its base
            weights are frozen: ZO never perturbs them and backprop gives them no gradient); a side without
            trains all its weights. ``strategy.peft_model`` is the PeftModel for saving and merging
            (:mod:`hosl_lightning.adapters`). In-process runs only; needs ``pip install 'hosl-lightning[peft]'``.
    """

    strategy_name = STRATEGY_NAME

    def __init__(
        self,
        cut_layer: int = 1,
        mode: Mode = "hosl",
        q: int = 1,
        mu: float = 1e-3,
        zo_lr: float = 1e-6,
        zo_weight_decay: float = 0.0,
        direction: str = "gaussian",
        seed: int = 0,
        server_grad: ServerGrad = "perturbed",
        batch_probes: bool = True,
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
        **kwargs: Any,
    ) -> None:
        check_int("cut_layer", cut_layer, 0)
        check_choice("mode", mode, MODES)
        check_int("q", q, 1)
        check_number("mu", mu, 0, strict=True)
        check_number("zo_lr", zo_lr, 0)
        check_number("zo_weight_decay", zo_weight_decay, 0)
        check_choice("direction", direction, DIRECTIONS)
        check_int("seed", seed, 0)
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
        super().__init__(device="cpu", **kwargs)
        self.client_adapter, self.server_adapter = client_adapter, server_adapter
        self.peft_model: Any = None  # the PeftModel around the adapted model, once adapters are injected
        self.cut_layer = cut_layer
        self.mode = mode
        self.settings = ZOSettings(queries=q, mu=float(mu), server_grad=server_grad, batch_probes=batch_probes)
        self.zo_lr = float(zo_lr)
        self.zo_weight_decay = float(zo_weight_decay)
        self.direction = direction
        self.seed = seed
        self._client_device = None if client_device is None else torch.device(client_device)
        self._server_device = None if server_device is None else torch.device(server_device)
        self.parallel_devices: list[torch.device] | None = None  # filled in by the Trainer from `devices`
        self.client_optimizer: ZOSGD | None = None
        self.zo_steps = 0  # ZO steps taken: the step index of the next direction seeds
        self._pending_state: dict[str, Any] | None = None
        self.memory_every_n_steps = memory_every_n_steps
        self.memory_report: MemoryReport | None = None  # the latest measurement, see memory_every_n_steps
        self._steps_seen = 0  # training steps started in this fit
        self._last_step_time: float | None = None
        self._step_started = 0.0
        self._server_seconds = 0.0  # time spent in server-side work during the current step
        self._switched_at = 0.0
        # Which half is working: the split model's client_side/server_side enter it; time and memory follow it.
        self._sides = SideSwitch()
        self._sides.listeners.append(self._time_sides)
        self._split: SplitCausalLM | None = None
        self._optimizer_sides: dict[int, str] = {}
        self.transport = transport
        self._peers = Peers(backend, float(timeout_s), init_method, rank, world_size)
        self.schedule, self.client_sync = schedule, client_sync
        self.steps_per_turn, self.sync_every_n_steps = steps_per_turn, sync_every_n_steps
        self.server_checkpoint_dir = server_checkpoint_dir
        self.clients = 1  # client processes in a distributed run (world size - 1)
        self._client_sync: ClientSync | None = None
        self._failure: BaseException | None = None

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

    def _wait_for_others_s(self) -> float:
        """How long a client may wait for the others: every step they may take before it is its go."""
        return self.timeout_s * (max(self.steps_per_turn, self.sync_every_n_steps) * self.clients + 1)

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.role == "client":
            # torchrun gives the client RANK=1, which would silence Lightning's rank-zero-only logging and
            # checkpointing; the client is the only process that runs a Trainer, so it is rank zero for them.
            from lightning_utilities.core.rank_zero import rank_zero_only

            rank_zero_only.rank = 0  # type: ignore[attr-defined]
            # It connects at the cut, once its half is loaded: a slow load never counts against timeout_s.

    def on_exception(self, exception: BaseException) -> None:
        """A failing client tells the server why (instead of vanishing mid-protocol) and waits for no one."""
        self._failure = exception
        if self.role == "client" and self._wire is not None:
            try:
                self._wire.send("error", wait=False, message=f"{type(exception).__name__}: {exception}")
            except Exception:  # noqa: BLE001, S110 - the server is gone: the original error is the one to report
                pass
        super().on_exception(exception)

    def teardown(self) -> None:
        if self.role == "client" and self._wire is not None:
            try:
                if self._failure is None:
                    if self._client_sync is not None:
                        self._client_sync.finish(self._wait_for_others_s())
                    self._remote.close()
                else:
                    self._wire.flush()  # the error message sent by on_exception
            except WireError:
                if self._failure is None:
                    raise
            finally:
                self._peers.disconnect()
        super().teardown()

    @property
    def _remote(self) -> RemoteServer:
        split = self.split_model
        assert isinstance(split, ClientSplitCausalLM)
        return split.remote

    def _checkpoint_name(self, filepath: Any) -> str:
        return os.path.basename(os.fspath(filepath))

    def _client_zo_count(self, client: nn.Module) -> int:
        if self.mode == "fo":
            return 0
        return sum(1 for p in client.parameters() if p.requires_grad or getattr(p, "_hosl_zo", False))

    def serve(self, module: LightningModule) -> int:
        """Run the server of a distributed run (rank 0) until the client is done; returns the steps served.

        ``module`` is the same LightningModule the client trains (e.g. built from the same config); the server
        keeps only its half of the model, trains it with the module's own optimizer (and scheduler), and saves
        its half of every checkpoint the client saves.
        """
        if self.role != "server":
            raise RuntimeError(f"serve() runs the server (rank {SERVER_RANK}); this process is the {self.role}")
        # Load first, then connect: a slow load (or download) never counts against timeout_s.
        name, model = find_causal_lm(module)
        client, server = split_causal_lm(model, self.cut_layer)
        device = self._server_device or torch.device("cpu")
        if any(p.is_meta for p in server.parameters()):
            materialize_half(model, server, device)
        server.to(device)
        split = SplitCausalLM.from_halves(None, server, model.config, self.cut_layer)
        self._install(module, name, split)
        self._connect()
        try:
            first_key = self._client_zo_count(client)
            if self.mode == "zo":
                named = [(n, p) for n, p in server.named_parameters() if p.requires_grad]
                for _, param in named:
                    param.requires_grad_(False)
                optimizer: Optimizer = ZOSGD(named, self.zo_lr, self.zo_weight_decay, self.direction, self.seed, first_key=first_key)
                scheduler = None
            else:
                optimizer, scheduler = _optimizer_and_scheduler(module.configure_optimizers())
            worker = SplitServer(split, self._peers.client_wires, self.mode, self.settings, optimizer, scheduler,
                                 expected=self._hello_settings(first_key), schedule=self.schedule,
                                 checkpoint_dir=self.server_checkpoint_dir)
            return worker.serve()
        finally:
            self._peers.disconnect()

    def _hello_settings(self, client_zo_params: int) -> dict[str, Any]:
        return {
            "cut_layer": self.cut_layer, "seed": self.seed, "direction": self.direction, "q": self.settings.queries,
            "mu": self.settings.mu, "server_grad": self.settings.server_grad, "client_zo_params": client_zo_params,
            "clients": self.clients, "schedule": self.schedule, "client_sync": self.client_sync,
            "zo_lr": self.zo_lr, "zo_weight_decay": self.zo_weight_decay,
            "steps_per_turn": self.steps_per_turn, "sync_every_n_steps": self.sync_every_n_steps,
        }

    # ---- placement -------------------------------------------------------------------------------------
    @property
    def root_device(self) -> torch.device:
        """The Trainer's device (from its accelerator and ``devices``), as Lightning's own strategies do."""
        return self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # checkpoints hold the split model's keys: load them after the cut

    @property
    def split_model(self) -> SplitCausalLM:
        """The SplitCausalLM inside the LightningModule (found once, at the cut)."""
        if self._split is None:
            raise RuntimeError("the model has not been cut yet: HOSLStrategy.setup runs when the Trainer starts")
        return self._split

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)
        self.split_model.place(self._client_device or self.root_device, self._server_device or self.root_device)

    # ---- setup -----------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        assert self.lightning_module is not None
        self._check_precision()
        self._cut(self.lightning_module)
        self._steps_seen = 0
        super().setup(trainer)
        if self.role == "client":
            client = self.split_model.client
            self._remote.hello(mode=self.mode, client_digest=weights_digest(client) if self.clients > 1 else None,
                               **self._hello_settings(self._client_zo_count(client)))

    def _check_precision(self) -> None:
        plugin = self.precision_plugin
        if self.transport == "distributed" and plugin.precision != "32-true":
            raise ValueError(
                f"precision={plugin.precision!r}: a distributed run computes in float32 on both sides (the server "
                "has no precision plugin), so use precision '32-true' or transport='in_process'"
            )
        if self.mode != "fo" and isinstance(plugin, HalfPrecision):
            raise ValueError(
                f"precision={plugin.precision!r} stores weights in half precision, but mode={self.mode!r} updates "
                "client weights by zeroth-order steps, which need float32: use precision '32-true' or 'bf16-mixed'"
            )
        if self.mode == "zo" and isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise ValueError(
                "precision='16-mixed' uses a GradScaler, which must never touch zeroth-order updates, and "
                "mode='zo' trains only by them: use precision '32-true' or 'bf16-mixed'"
            )

    def _install(self, module: LightningModule, name: str, split: SplitCausalLM) -> None:
        if not name:
            raise ValueError("HOSLStrategy needs the causal LM as an attribute of a LightningModule, not the module itself")
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attribute, split)
        self._split = split
        self._sides.install(split)

    def _client_split(self, model: nn.Module) -> SplitCausalLM:
        """The client process's split model: its half only (materialised from the source if built on meta)."""
        client, _ = split_causal_lm(model, self.cut_layer)  # type: ignore[arg-type]
        if any(p.is_meta for p in client.parameters()):
            materialize_half(model, client, self._client_device or self.root_device)  # type: ignore[arg-type]
        split = ClientSplitCausalLM.from_halves(client, None, model.config, self.cut_layer)
        split.remote = RemoteServer(self._connect(), split.boundary.traffic)
        return split

    def _cut(self, module: LightningModule) -> None:
        name, model = find_causal_lm(module)
        if isinstance(model, SplitCausalLM):
            self._split = model  # already cut (a second fit/validate on the same module)
            self._sides.install(model)
            return
        if self.role == "server":
            raise RuntimeError("the server process of a distributed run does not run a Trainer: call strategy.serve(module)")
        if any(p.is_meta for p in model.parameters()) and self.role == "both":
            raise ValueError(
                "the model was built on the meta device (hosl_lightning.models.deferred_weights) for a distributed "
                "run, but this strategy has transport='in_process': build it without deferred_weights"
            )
        if self.client_adapter is not None or self.server_adapter is not None:
            self.peft_model = add_adapters(model, self.cut_layer, self.client_adapter, self.server_adapter)
        split = self._client_split(model) if self.role == "client" else SplitCausalLM(model, self.cut_layer)
        if self.peft_model is not None:
            untied_head_trainable(self.peft_model, split.server.lm_head)
        self._install(module, name, split)
        zeroth_order = [split.client] if self.mode == "hosl" else [split.client, split.server] if self.mode == "zo" else []
        for half in [h for h in zeroth_order if h is not None]:
            for param in half.parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    param._hosl_zo = True  # type: ignore[attr-defined]  # trained by ZO, never by backprop

    def _time_sides(self, old: str, new: str) -> None:
        """Times the server's share of a step; the rest of the step is the client's."""
        now = time.perf_counter()
        if old == "server":
            self._server_seconds += now - self._switched_at
        self._switched_at = now

    def _start_step(self) -> None:
        self.split_model.boundary.traffic.reset()
        self._server_seconds, self._step_started = 0.0, time.perf_counter()
        self._switched_at = self._step_started

    # ---- memory ----------------------------------------------------------------------------------------
    @contextmanager
    def _measured_step(self) -> Iterator[None]:
        """Measures both sides' memory over the enclosed step when the step is due (see memory_every_n_steps)."""
        assert self.lightning_module is not None
        step = self.lightning_module.trainer.global_step
        every = self.memory_every_n_steps
        due = every > 0 and (self._steps_seen < 2 or step % every == 0)  # the first two: fo's state appears in step 1
        self._steps_seen += 1
        if not due or self.role == "client":  # a client process's own peak is measured whole (process_peak_rss_mib)
            yield
            return
        optimizers = [*self.optimizers, *([self.client_optimizer] if self.client_optimizer is not None else [])]
        meter = StepMemoryMeter(self.split_model, self._sides, optimizers)
        with meter:
            yield
        self.memory_report = meter.report(step, self.mode)

    def _memory_metrics(self) -> dict[str, float]:
        if self.role == "client":  # the process holds only the client: its peak resident memory is the client's
            return {"memory/process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        report = self.memory_report
        return {} if report is None else {f"memory/{k}": v for k, v in report.metrics().items()}

    def _side_of(self, optimizer: Optimizer) -> str:
        """The half whose parameters ``optimizer`` updates, or "shared" when it updates both (fo, zo)."""
        if self.role == "client":
            return "client"
        if id(optimizer) not in self._optimizer_sides:
            split = self.split_model
            owner = {id(p): "server" for p in split.server.parameters()}
            owner |= {id(p): "client" for p in split.client.parameters()}
            updated = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad or isinstance(optimizer, ZOSGD)]
            sides = {owner.get(id(p), "shared") for p in updated}
            self._optimizer_sides[id(optimizer)] = sides.pop() if len(sides) == 1 else "shared"
        return self._optimizer_sides[id(optimizer)]

    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        """The first-order optimizer's step is its half's work (both halves' in fo and zo: "shared")."""
        side = self._side_of(optimizer)
        module = self.lightning_module
        if module is None or not module.automatic_optimization:
            with self._sides.enter(side):
                return super().optimizer_step(optimizer, closure, model, **kwargs)

        def client_closure() -> Any:  # training_step, zero_grad and backward: each places its own work
            with self._sides.enter("client"):
                return closure()

        # With automatic optimization, Lightning runs the whole step (the closure) inside the optimizer's step.
        with self._measured_step(), self._sides.enter(side):
            return super().optimizer_step(optimizer, client_closure, model, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        module = self.lightning_module
        if module is None or not module.automatic_optimization:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # the step functions place it
        # Lightning's own backward of a drop-in module's loss: only the server's graph in hosl (the client is
        # frozen); in fo one backward runs through both halves at once, so it is shared.
        with self._sides.enter("server" if self.mode == "hosl" else "shared"):
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _zo_named_parameters(self, *halves: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for half in halves for n, p in half.named_parameters() if getattr(p, "_hosl_zo", False)]

    def _new_zo_optimizer(self, *halves: nn.Module) -> ZOSGD:
        seed = self.seed if self.role != "client" else client_seed(self.seed, self._peers.rank(), self.clients)
        return ZOSGD(self._zo_named_parameters(*halves), self.zo_lr, self.zo_weight_decay, self.direction, seed)

    def setup_optimizers(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        split = self.split_model
        if self.role == "client" and self.mode != "fo":
            # The client's only optimizer is its ZOSGD; registered with Lightning so each step counts once.
            self.optimizers, self.lr_scheduler_configs = [self._new_zo_optimizer(split.client)], []
            self.client_optimizer = self.optimizers[0] if self.mode == "hosl" else None
            self._optimizer_sides = {}
            self._apply_pending_state()
            self._start_client_sync()
            return
        if self.mode == "zo":
            if module.automatic_optimization:
                raise ValueError(
                    "mode='zo' trains both halves without gradients, which a module with automatic optimization "
                    "cannot express; use hosl_lightning.HOSLModule (or mode 'hosl' / 'fo')"
                )
            self.optimizers, self.lr_scheduler_configs = [self._new_zo_optimizer(split.client, split.server)], []
        else:
            super().setup_optimizers(trainer)
        if self.mode == "hosl":
            self.client_optimizer = self._new_zo_optimizer(split.client)
        self._optimizer_sides = {}
        self._apply_pending_state()
        if self.role == "client":
            self._start_client_sync()

    def _start_client_sync(self) -> None:
        if self.clients > 1:
            assert self._wire is not None
            self._client_sync = ClientSync(self._wire, self.split_model.client, self.client_optimizer, self.schedule,
                                           self.client_sync, self.steps_per_turn, self.sync_every_n_steps)
            if self.client_optimizer is not None and self.client_sync == "seeds":
                check_replayable(self.client_optimizer)

    # ---- the step --------------------------------------------------------------------------------------
    def run_step(self, batch: dict[str, Tensor]) -> StepOutput:
        """One training step of the configured mode for a manual-optimization module; steps the optimizer once."""
        module = self.lightning_module
        assert module is not None and not module.automatic_optimization
        optimizer = module.optimizers()
        assert not isinstance(optimizer, list), "HOSLModule configures exactly one first-order optimizer"
        self._start_step()
        step = self.zo_steps
        if self.role == "client":
            output = self._client_step(batch, optimizer, step)
        else:
            output = self._in_process_step(batch, optimizer, step)
        optimizer.zero_grad(set_to_none=True)
        self.zo_steps += 1
        self._log_step(output.estimate)
        return output

    def _client_step(self, batch: dict[str, Tensor], optimizer: Any, step: int) -> StepOutput:
        """The client's share of a step in a distributed run; the server does its share in its own process."""
        split = self.split_model
        assert isinstance(split, ClientSplitCausalLM)
        split.remote.training = split.training
        sync, wait_s = self._client_sync, self._wait_for_others_s()
        if sync is not None:
            sync.before_step(wait_s)
        if self.mode == "fo":
            output = client_fo_step(split, batch, lambda tensor, gradient: tensor.backward(gradient))
            optimizer.step()
            update = None
        else:
            zo = optimizer.optimizer
            step_fn = client_hosl_step if self.mode == "hosl" else client_zo_step
            output = step_fn(split, batch, zo, self.settings, step)
            optimizer.step(estimate=output.estimate)
            assert output.estimate is not None
            update = ZOUpdate(zo.sampler.seed, step, zo.param_groups[0]["lr"], tuple(output.estimate.coefficients.tolist()))
        if sync is not None:
            sync.after_step(update, wait_s)
        return output

    def _in_process_step(self, batch: dict[str, Tensor], optimizer: Any, step: int) -> StepOutput:
        module = self.lightning_module
        assert module is not None
        split = self.split_model
        with self._measured_step():
            if self.mode == "hosl":
                assert self.client_optimizer is not None
                output = hosl_step(split, batch, self.client_optimizer, self.settings, step, module.manual_backward)
                optimizer.step()
            elif self.mode == "fo":
                output = fo_step(split, batch, module.manual_backward)
                optimizer.step()
            else:
                zo = optimizer.optimizer  # the one ZOSGD over both halves
                output = zo_step(split, batch, zo, self.settings, step, lambda e: optimizer.step(estimate=e))
        return output

    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """For automatic-optimization modules in hosl mode: ZO-probe the user's own training_step."""
        module = self.lightning_module
        assert module is not None
        weight = _pop_loss_weight(args) if module.automatic_optimization else None  # HOSLModule weighs its own loss
        if not module.automatic_optimization or self.mode != "hosl":
            output = _scaled(super().training_step(*args, **kwargs), weight)
            if module.automatic_optimization and self.memory_report is not None:
                module.log_dict({f"hosl/{k}": v for k, v in self._memory_metrics().items()}, on_step=True, on_epoch=False)
            return output
        assert self.client_optimizer is not None
        split, step, optimizer = self.split_model, self.zo_steps, self.client_optimizer
        base_step = super().training_step
        self._start_step()

        # The user's training_step is the server's loss oracle: its only client work is the model's client
        # forward, which places itself on the client side.
        def probe(query: int, sign: float) -> Tensor:
            perturbed = optimizer.perturbed([split.client], step, query, sign * self.settings.mu)
            with torch.no_grad(), perturbed, _silenced_logging(module), split.server_side():
                return _loss_of(_scaled(base_step(*args, **kwargs), weight))

        with eval_mode(module):
            coefficients, _ = two_point_estimate(probe, torch.stack, self.settings.queries, self.settings.mu)
        with split.server_side():
            output = _scaled(base_step(*args, **kwargs), weight)  # unperturbed, with autograd: trains the server
        estimate = ZOEstimate(step, coefficients)
        with split.client_side():
            optimizer.step(estimate=estimate)
        self.zo_steps += 1
        self._log_step(estimate)
        return output

    def _log_step(self, estimate: ZOEstimate | None) -> None:
        module = self.lightning_module
        assert module is not None
        now = time.perf_counter()
        metrics: dict[str, float] = {
            "server_sec": self._server_seconds,
            "client_sec": max(now - self._step_started - self._server_seconds, 0.0),
        }
        if self._last_step_time is not None:
            metrics["steps_per_sec"] = 1.0 / max(now - self._last_step_time, 1e-9)
        self._last_step_time = now
        if estimate is not None:
            metrics["zo_grad_abs"] = float(estimate.coefficients.abs().mean())
        if self.optimizers:  # the server's optimizer; in zo mode the one ZOSGD that trains both halves
            metrics["lr_server"] = self.optimizers[0].param_groups[0]["lr"]
        client = self.client_optimizer or (self.optimizers[0] if self.mode == "zo" else None)
        if client is not None:
            metrics["lr_client"] = client.param_groups[0]["lr"]
        traffic = self.split_model.boundary.traffic
        metrics["bytes_up"], metrics["bytes_down"] = float(traffic.bytes_up), float(traffic.bytes_down)
        if self._client_sync is not None:  # all that keeping the clients in step has cost so far
            metrics["sync_bytes_up"] = float(self._client_sync.bytes_up)
            metrics["sync_bytes_down"] = float(self._client_sync.bytes_down)
        metrics.update(self._memory_metrics())  # the latest measurement, on every step: loggers sample every n steps
        module.log_dict({f"hosl/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False, prog_bar=False)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def hosl_state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "cut_layer": self.cut_layer,
            "seed": self.seed,
            "direction": self.direction,
            "zo_steps": self.zo_steps,
            "client_optimizer": None if self.client_optimizer is None else self.client_optimizer.state_dict(),
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.role == "client":  # the server first: a client checkpoint on disk always has its server half
            self._remote.save(self._checkpoint_name(filepath))
        super().save_checkpoint({**checkpoint, "hosl": self.hosl_state_dict()}, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get("hosl")
        if state is not None:
            for key in ("mode", "cut_layer", "seed", "direction"):
                if state[key] != getattr(self, key):
                    raise ValueError(
                        f"checkpoint {checkpoint_path} was saved with {key}={state[key]!r}, this run has "
                        f"{key}={getattr(self, key)!r}: resume with the same {key}"
                    )
            self.zo_steps = state["zo_steps"]
            if self.role == "client":
                self._remote.load(self._checkpoint_name(checkpoint_path))
            self._pending_state = state
            self._apply_pending_state()
        return checkpoint

    def _apply_pending_state(self) -> None:
        """The client's ZO optimizer exists only after setup; restore it whichever comes first."""
        state = self._pending_state
        if state is None or self.client_optimizer is None:
            return
        if state["client_optimizer"] is not None:
            self.client_optimizer.load_state_dict(state["client_optimizer"])
        self._pending_state = None

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if STRATEGY_NAME not in strategy_registry:
            strategy_registry.register(STRATEGY_NAME, cls, description="Hybrid-order split learning (hosl-lightning)")


def _optimizer_and_scheduler(configured: Any) -> tuple[Optimizer, Any | None]:
    """The optimizer and (optional) scheduler of what ``configure_optimizers`` returned, for the server process."""
    if isinstance(configured, Optimizer):
        return configured, None
    if isinstance(configured, dict) and isinstance(configured.get("optimizer"), Optimizer):
        scheduler = configured.get("lr_scheduler")
        return configured["optimizer"], scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
    raise TypeError(
        "the server of a distributed run supports configure_optimizers returning one optimizer or a dict with "
        f"'optimizer' and 'lr_scheduler', got {type(configured).__name__}"
    )


HOSLStrategy.register_strategies(StrategyRegistry)
