"""HOSLStrategy: cut the model, place the halves, and run each step of the chosen mode.

It wires plug-ins together: the mode (:mod:`hosl_lightning.modes`) over a link (in-process, the wire, or a
drop-in module's own ``training_step``), the peers of a distributed run (:mod:`hosl_lightning.distributed`),
:class:`~.launcher.ServerLauncher` for the server process, :class:`~.checkpoint_io.SplitCheckpointIO` for the
server's half of checkpoints, and :class:`~.telemetry.StepTelemetry` for time, bytes and memory per half.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.optim import Optimizer

from hosl_lightning.core.boundary import InProcessLink, Reply, Targets, Uplink
from hosl_lightning.core.split_model import SplitCausalLM, find_causal_lm
from hosl_lightning.core.zo import ZOSGD, ZOEstimate
from hosl_lightning.distributed.client import ClientSplitCausalLM, RemoteServer
from hosl_lightning.distributed.peers import SERVER_RANK
from hosl_lightning.distributed.serving import (
    SplitServer,
    load_server_half,
    server_optimizer,
    zo_parameter_count,
)
from hosl_lightning.distributed.sync import ZOUpdate, client_seed, weights_digest
from hosl_lightning.lightning.checkpoint_io import SplitCheckpointIO
from hosl_lightning.lightning.dropin import DropInLink, pop_loss_weight, scaled
from hosl_lightning.lightning.launcher import ServerLauncher
from hosl_lightning.lightning.settings import (
    STRATEGY_NAME,
    RunSettings,
    check_precision,
)
from hosl_lightning.lightning.telemetry import StepTelemetry, prefixed
from hosl_lightning.measurement import MemoryReport
from hosl_lightning.models import add_adapters, materialize_half, untied_head_trainable
from hosl_lightning.modes import (
    READ_BY_THE_MODULE,
    ClientContext,
    ModeName,
    ServerContext,
    ServerGrad,
    StepInputs,
    StepOutput,
    get_mode,
)


class HOSLStrategy(RunSettings, SingleDeviceStrategy):
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
            Unset: ``"perturbed"``, or ``"clean"`` for a drop-in module (its unperturbed call runs anyway, for the
            loss it logs); a drop-in module refuses the others.
        batch_probes: compute the 2Q server losses in one batched forward (faster) instead of one at a time.
            Unset: batched; a drop-in module runs its probes one at a time and refuses True.
        client_device / server_device: where each half lives (e.g. ``"cpu"`` and ``"cuda:0"`` to emulate an
            edge device beside a server); by default the Trainer's device.
        memory_every_n_steps: measure each side's memory (peak, parameters, gradients, optimizer state,
            activations) on the first two steps of a fit and then on every step whose index is a multiple of
            n; 0 turns it off. A measured step is slower (on CPU, torch's MemTracker sees every tensor);
            other steps pay nothing. The latest :class:`~hosl_lightning.measurement.MemoryReport` is
            ``strategy.memory_report`` and is logged on every step under ``hosl/memory/`` (see
            :mod:`hosl_lightning.measurement` for what is measured how on CPU and CUDA).
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
            (:mod:`hosl_lightning.models`). In-process runs only; needs ``pip install 'hosl-lightning[peft]'``.
    """

    strategy_name = STRATEGY_NAME

    def __init__(
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
        **kwargs: Any,
    ) -> None:
        self._init_settings(cut_layer=cut_layer, mode=mode, q=q, mu=mu, zo_lr=zo_lr, zo_weight_decay=zo_weight_decay,
            direction=direction, seed=seed, server_grad=server_grad, batch_probes=batch_probes,
            client_device=client_device, server_device=server_device, memory_every_n_steps=memory_every_n_steps,
            transport=transport, backend=backend, timeout_s=timeout_s, init_method=init_method, rank=rank,
            world_size=world_size, schedule=schedule, client_sync=client_sync, steps_per_turn=steps_per_turn,
            sync_every_n_steps=sync_every_n_steps, server_checkpoint_dir=server_checkpoint_dir,
            client_adapter=client_adapter, server_adapter=server_adapter)
        super().__init__(device="cpu", checkpoint_io=SplitCheckpointIO(), **kwargs)
        self.peft_model: Any = None  # the PeftModel around the adapted model, once adapters are injected
        self.parallel_devices: list[torch.device] | None = None  # filled in by the Trainer from `devices`
        self.zo_steps = 0  # ZO steps taken: the step index of the next direction seeds
        self._pending_state: dict[str, Any] | None = None
        self.telemetry = StepTelemetry(self.memory_every_n_steps)
        self._split: SplitCausalLM | None = None
        self._failure: BaseException | None = None

    # ---- plug-ins ----------------------------------------------------------------------------------------
    def _configure_launcher(self) -> None:
        self._launcher = ServerLauncher(self)

    @property
    def memory_report(self) -> MemoryReport | None:
        """The latest per-side memory measurement (see ``memory_every_n_steps``)."""
        return self.telemetry.memory_report

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

    @property
    def _remote(self) -> RemoteServer:
        split = self.split_model
        assert isinstance(split, ClientSplitCausalLM)
        return split.remote

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)
        self.split_model.place(self._client_device or self.root_device, self._server_device or self.root_device)

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        assert self.lightning_module is not None
        check_precision(self.precision_plugin, self.mode, self.transport)
        self._cut(self.lightning_module)
        self.telemetry.steps_seen = 0
        super().setup(trainer)
        if self.role == "client":
            client = self.split_model.client
            self._remote.hello(mode=self.mode, client_digest=weights_digest(client) if self.clients > 1 else None,
                               **self.hello_settings(zo_parameter_count(client, self.mode)))

    def _install(self, module: LightningModule, name: str, split: SplitCausalLM) -> None:
        if not name:
            raise ValueError("HOSLStrategy needs the causal LM as an attribute of a LightningModule, not the module itself")
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attribute, split)
        self._split = split
        self.telemetry.install(split)

    def _client_split(self, model: nn.Module) -> SplitCausalLM:
        """The client process's split model: its half only (materialised from the source if built on meta)."""
        from hosl_lightning.core.split import split_causal_lm

        client, _ = split_causal_lm(model, self.cut_layer)  # type: ignore[arg-type]
        if any(p.is_meta for p in client.parameters()):
            materialize_half(model, client, self._client_device or self.root_device)  # type: ignore[arg-type]
        split = ClientSplitCausalLM.from_halves(client, None, model.config, self.cut_layer)
        split.remote = RemoteServer(self._connect(), split.boundary.traffic)
        assert isinstance(self.checkpoint_io, SplitCheckpointIO)
        self.checkpoint_io.remote = split.remote
        return split

    def _cut(self, module: LightningModule) -> None:
        name, model = find_causal_lm(module)
        if isinstance(model, SplitCausalLM):
            self._split = model  # already cut (a second fit/validate on the same module)
            self.telemetry.install(model)
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
        for half in [getattr(split, side) for side in get_mode(self.mode).zo_halves]:
            for param in half.parameters() if half is not None else ():
                if param.requires_grad:
                    param.requires_grad_(False)
                    param._hosl_zo = True  # type: ignore[attr-defined]  # trained by ZO, never by backprop

    def _new_zo_optimizer(self, *halves: nn.Module) -> ZOSGD:
        seed = self.seed if self.role != "client" else client_seed(self.seed, self._peers.rank(), self.clients)
        named = [(n, p) for half in halves for n, p in half.named_parameters() if getattr(p, "_hosl_zo", False)]
        return ZOSGD(named, self.zo_lr, self.zo_weight_decay, self.direction, seed)

    def setup_optimizers(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        split, zo_halves = self.split_model, get_mode(self.mode).zo_halves
        if "server" in zo_halves and self.role != "client":
            if module.automatic_optimization:
                raise ValueError(
                    f"mode={self.mode!r} trains both halves without gradients, which a module with automatic "
                    "optimization cannot express; use hosl_lightning.HOSLModule (or mode 'hosl' / 'fo')"
                )
            self.optimizers, self.lr_scheduler_configs = [self._new_zo_optimizer(split.client, split.server)], []
        elif "client" in zo_halves and self.role == "client":
            # The client's only optimizer is its ZOSGD; registered with Lightning so each step counts once.
            self.optimizers, self.lr_scheduler_configs = [self._new_zo_optimizer(split.client)], []
            self.client_optimizer = self.optimizers[0] if "server" not in zo_halves else None
        else:
            super().setup_optimizers(trainer)
            if "client" in zo_halves:
                self.client_optimizer = self._new_zo_optimizer(split.client)
        self._apply_pending_state()
        if self.role == "client":
            self._start_client_sync()
        if module.automatic_optimization:
            self.check_dropin()

    # ---- the step --------------------------------------------------------------------------------------
    def run_step(self, batch: dict[str, Tensor]) -> StepOutput:
        """One training step of the configured mode for a manual-optimization module; steps the optimizer once."""
        module = self.lightning_module
        assert module is not None and not module.automatic_optimization
        optimizer = module.optimizers()
        assert not isinstance(optimizer, list), "HOSLModule configures exactly one first-order optimizer"
        split, step = self.split_model, self.zo_steps
        self.telemetry.start_step(split)
        if self.role == "client":
            output = self._client_process_step(split, batch, optimizer, step)
        else:
            optimizers = [*self.optimizers, *([self.client_optimizer] if self.client_optimizer is not None else [])]
            with self.telemetry.measured(split, module.trainer.global_step, self.mode, optimizers, self.role):
                output = self._in_process_step(split, batch, optimizer, step, module.manual_backward)
        optimizer.zero_grad(set_to_none=True)
        self.zo_steps += 1
        self._log_step(output.estimate)
        return output

    def _in_process_step(self, split: SplitCausalLM, batch: dict[str, Tensor], optimizer: Any, step: int,
                         backward: Any) -> StepOutput:
        mode = get_mode(self.mode)
        both_zo = "server" in mode.zo_halves
        zo = optimizer.optimizer if both_zo else self.client_optimizer  # zo: the one ZOSGD over both halves
        server = ServerContext(split, self.settings, backward, zo if both_zo else None)

        def server_step(name: str, uplink: Uplink, targets: Targets, at_step: int) -> Reply:
            return get_mode(name).server_step(server, uplink, targets, at_step)

        link = InProcessLink(split.boundary, server_step, split.client_side, split.server_side)
        output = mode.client_step(ClientContext(split, self.settings, step, zo), link, StepInputs.of(batch))
        if both_zo:
            optimizer.step(estimate=output.estimate)
        else:
            if output.estimate is not None:
                assert self.client_optimizer is not None
                with split.client_side():
                    self.client_optimizer.step(estimate=output.estimate)
            optimizer.step()
        return output

    def _client_process_step(self, split: SplitCausalLM, batch: dict[str, Tensor], optimizer: Any, step: int) -> StepOutput:
        """The client's share of a step in a distributed run; the server does its share in its own process."""
        assert isinstance(split, ClientSplitCausalLM)
        split.remote.training = split.training
        sync, wait_s = self._client_sync, self.wait_for_others_s()
        if sync is not None:
            sync.before_step(wait_s)
        zo = optimizer.optimizer if "client" in get_mode(self.mode).zo_halves else None
        context = ClientContext(split, self.settings, step, zo)
        output = get_mode(self.mode).client_step(context, split.remote, StepInputs.of(batch))
        update = None
        if output.estimate is None:
            optimizer.step()
        else:
            optimizer.step(estimate=output.estimate)
            update = ZOUpdate(zo.sampler.seed, step, zo.param_groups[0]["lr"], tuple(output.estimate.coefficients.tolist()))
        if sync is not None:
            sync.after_step(update, wait_s)
        return output

    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """For automatic-optimization (drop-in) modules in hosl mode: the mode's client half over the module's step."""
        module = self.lightning_module
        assert module is not None
        weight = pop_loss_weight(args) if module.automatic_optimization else None  # HOSLModule weighs its own loss
        if not module.automatic_optimization or self.mode != "hosl":
            output = scaled(super().training_step(*args, **kwargs), weight)
            if module.automatic_optimization and self.memory_report is not None:
                module.log_dict(prefixed(self.telemetry.memory_metrics(self.role)), on_step=True, on_epoch=False)
            return output
        assert self.client_optimizer is not None
        split, step = self.split_model, self.zo_steps
        base_step = super().training_step
        self.telemetry.start_step(split)
        link = DropInLink(module, split, lambda: base_step(*args, **kwargs), weight)
        context = ClientContext(split, self.dropin_settings(), step, self.client_optimizer)
        output = get_mode("hosl").client_step(context, link, READ_BY_THE_MODULE)
        assert output.estimate is not None
        with split.client_side():
            self.client_optimizer.step(estimate=output.estimate)
        self.zo_steps += 1
        self._log_step(output.estimate)
        return link.output

    def _log_step(self, estimate: ZOEstimate | None) -> None:
        module = self.lightning_module
        assert module is not None
        client = self.client_optimizer or (self.optimizers[0] if self.mode == "zo" else None)
        extra = {}
        if self._client_sync is not None:  # all that keeping the clients in step has cost so far
            extra = {"sync_bytes_up": float(self._client_sync.bytes_up),
                     "sync_bytes_down": float(self._client_sync.bytes_down)}
        metrics = self.telemetry.step_metrics(self.split_model, estimate, self.optimizers[0] if self.optimizers else None,
                                              client, self.role, extra)
        module.log_dict(prefixed(metrics), on_step=True, on_epoch=False, prog_bar=False)

    # ---- where each half's work goes (time and memory) -------------------------------------------------
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """The first-order optimizer's step is its half's work (both halves' in fo and zo: "shared")."""
        side = self.telemetry.side_of(optimizer, self.split_model, self.role)
        module, sides = self.lightning_module, self.telemetry.sides
        if module is None or not module.automatic_optimization:
            with sides.enter(side):
                return super().optimizer_step(optimizer, closure, model, **kwargs)

        def client_closure() -> Any:  # training_step, zero_grad and backward: each places its own work
            with sides.enter("client"):
                return closure()

        # With automatic optimization, Lightning runs the whole step (the closure) inside the optimizer's step.
        optimizers = [*self.optimizers, *([self.client_optimizer] if self.client_optimizer is not None else [])]
        with self.telemetry.measured(self.split_model, module.trainer.global_step, self.mode, optimizers, self.role), \
                sides.enter(side):
            return super().optimizer_step(optimizer, client_closure, model, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        module = self.lightning_module
        if module is None or not module.automatic_optimization:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # the modes place it
        # Lightning's own backward of a drop-in module's loss: only the server's graph in hosl (the client is
        # frozen); in fo one backward runs through both halves at once, so it is shared.
        with self.telemetry.sides.enter("server" if self.mode == "hosl" else "shared"):
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    # ---- the server process ----------------------------------------------------------------------------
    def serve(self, module: LightningModule) -> int:
        """Run the server of a distributed run (rank 0) until the clients are done; returns the steps served.

        ``module`` is the same LightningModule the client trains (e.g. built from the same config); the server
        keeps only its half of the model, trains it with the module's own optimizer (and scheduler), and saves
        its half of every checkpoint the client saves. ``trainer.fit`` on rank 0 calls this (ServerLauncher).
        """
        if self.role != "server":
            raise RuntimeError(f"serve() runs the server (rank {SERVER_RANK}); this process is the {self.role}")
        # Load first, then connect: a slow load (or download) never counts against timeout_s.
        name, split, client_zo = load_server_half(module, self.cut_layer, self._server_device or torch.device("cpu"))
        first_key = client_zo if self.mode != "fo" else 0
        self._install(module, name, split)
        self._connect()
        try:
            optimizer, scheduler = server_optimizer(
                module, split, get_mode(self.mode).zo_halves,
                lambda named: ZOSGD(named, self.zo_lr, self.zo_weight_decay, self.direction, self.seed, first_key=first_key))
            worker = SplitServer(split, self._peers.client_wires, self.mode, self.settings, optimizer, scheduler,
                                 expected=self.hello_settings(first_key), schedule=self.schedule,
                                 checkpoint_dir=self.server_checkpoint_dir)
            return worker.serve()
        finally:
            self._peers.disconnect()

    def on_exception(self, exception: BaseException) -> None:
        """A failing client tells the server why (instead of vanishing mid-protocol) and waits for no one."""
        self._failure = exception
        self.report_failure(exception)
        super().on_exception(exception)

    def teardown(self) -> None:
        self.close_peers(self._failure, self._remote.close if self.role == "client" and self._split else None)
        super().teardown()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def hosl_state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "cut_layer": self.cut_layer, "seed": self.seed, "direction": self.direction,
            "zo_steps": self.zo_steps,
            "client_optimizer": None if self.client_optimizer is None else self.client_optimizer.state_dict(),
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
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
            assert isinstance(self.checkpoint_io, SplitCheckpointIO)
            self.checkpoint_io.load_server_half(checkpoint_path)
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


HOSLStrategy.register_strategies(StrategyRegistry)
