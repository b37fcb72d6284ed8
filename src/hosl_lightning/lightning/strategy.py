"""HOSLStrategy: cut the model, place the halves, and run each step of the chosen mode. It wires plug-ins
together: the mode (:mod:`hosl_lightning.modes`) over a link (in-process, the wire, or a drop-in module's own
``training_step``), this process's role and peers (:class:`~.processes.SplitProcesses`),
:class:`~.launcher.ServerLauncher` for the server process, :class:`~.checkpoint_io.SplitCheckpoints` for checkpoints
(the server's half beside the user's CheckpointIO), and :class:`~.telemetry.StepTelemetry`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT, LRSchedulerConfig
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer

from hosl_lightning.core.fused_update import FusedUpdate
from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD, ZOEstimate, zo_lr_scheduler
from hosl_lightning.distributed.client import ClientSplitCausalLM, RemoteServer
from hosl_lightning.distributed.peers import SERVER_RANK
from hosl_lightning.distributed.serving import load_server_half, serve_half, zo_parameter_count
from hosl_lightning.distributed.sync import ZOUpdate, weights_digest
from hosl_lightning.lightning.checkpoint_io import SplitCheckpoints
from hosl_lightning.lightning.cut import client_process_split, cut_module, install_split
from hosl_lightning.lightning.decrease import PredictedDecrease
from hosl_lightning.lightning.dropin import dropin_step, pop_loss_weight, scaled
from hosl_lightning.lightning.fused_client import FusedClientUpdate
from hosl_lightning.lightning.launcher import ServerLauncher
from hosl_lightning.lightning.precision_checks import check_precision
from hosl_lightning.lightning.processes import SplitProcesses
from hosl_lightning.lightning.settings import STRATEGY_NAME, RunSettings
from hosl_lightning.lightning.summary import use_split_summaries
from hosl_lightning.lightning.telemetry import StepTelemetry, prefixed
from hosl_lightning.measurement import MemoryReport
from hosl_lightning.modes import ClientContext, ModeName, ServerGrad, StepInputs, StepOutput, get_mode
from hosl_lightning.modes.frozen import NoUpdate
from hosl_lightning.modes.in_process import in_process_step


class HOSLStrategy(RunSettings, SplitProcesses, SplitCheckpoints, FusedClientUpdate, SingleDeviceStrategy):
    # The options' documentation lives with their checks (settings.RunSettings); the class and its __init__ carry it.
    __doc__ = "Hybrid-order split learning: zeroth-order client, first-order server, cut at ``cut_layer``.\n\n" + (
        inspect.cleandoc(RunSettings.__doc__ or ""))

    strategy_name = STRATEGY_NAME

    def __init__(
        self,
        cut_layer: int = 1,
        mode: ModeName = "hosl",
        q: int | None = None,
        mu: float | None = None,
        zo_lr: float | None = None,
        zo_weight_decay: float | None = None,
        zo_lr_schedule: str | None = None,
        zo_optimizer: str | dict[str, Any] | None = None,
        embedding_directions: str | None = None,
        pair_probes: bool | None = None,
        direction: str | None = None,
        seed: int | None = None,
        server_grad: ServerGrad | None = None,
        batch_probes: bool | None = None,
        client_device: str | None = None,
        server_device: str | None = None,
        memory_every_n_steps: int = 0,
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
        client_frozen: list[str] | None = None,
        client_checkpointing: bool | None = None,
        fused_client_update: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self._init_settings({k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")})
        self._init_processes(backend, timeout_s, init_method, rank, world_size)
        self.client_optimizer: ZOSGD | None = None  # the client half's own ZOSGD (hosl), once built
        super().__init__(device="cpu", **kwargs)  # a checkpoint_io in kwargs is wrapped: see SplitCheckpoints
        self.peft_model: Any = None  # the PeftModel around the adapted model, once adapters are injected
        self.parallel_devices: list[torch.device] | None = None  # filled in by the Trainer from `devices`
        self.client_scheduler: Any = None  # the zo_lr schedule of a client ZOSGD that Lightning does not count
        self.zo_steps = 0  # ZO steps taken: the step index of the next direction seeds
        self._pending_state: dict[str, Any] | None = None
        self.telemetry = StepTelemetry(self.memory_every_n_steps)
        self.predicted_decrease = PredictedDecrease()  # hosl: what each half's update is worth, per step and per fit
        self._split: SplitCausalLM | None = None
        self._failure: BaseException | None = None
        self.fused_update: FusedUpdate | None = None  # the client's optimizer steps inside backward, once attached

    # ---- plug-ins ----------------------------------------------------------------------------------------
    def _configure_launcher(self) -> None:
        self._launcher = ServerLauncher(self)

    def check_launched(self) -> None:
        """A distributed run's process refuses to start without its rank, the world size and where to meet."""
        if self.transport == "distributed":
            self._peers.check_launched()

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

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)
        self.split_model.place(self._client_device or self.root_device, self._server_device or self.root_device)

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        assert self.lightning_module is not None
        check_precision(self.precision_plugin, self.mode, self.transport, self.fused_client_update,
                        self.settings.estimator)
        self._cut(self.lightning_module)
        use_split_summaries(trainer.callbacks)  # count the ZO-trained weights as trainable
        self.telemetry.steps_seen = 0
        super().setup(trainer)
        if self.role == "client":
            client = self.split_model.client
            drawing = self._drawing_optimizer()
            self.split_model.remote.hello(  # type: ignore[attr-defined]  # a client process's ClientSplitCausalLM
                mode=self.mode, client_digest=weights_digest(client) if self.clients > 1 else None,
                directions=None if drawing is None else drawing.direction_signature(),
                **self.hello_settings(zo_parameter_count(client, self.mode)))

    def _client_split(self, model: nn.Module) -> SplitCausalLM:
        """The client process's split model: its half only, its server behind the wire."""
        split = client_process_split(model, self.cut_layer, self._client_device or self.root_device)
        split.remote = RemoteServer(self._connect(), split.boundary.traffic)
        self.checkpoint_io.remote = split.remote
        return split

    def _cut(self, module: LightningModule) -> None:
        mode = get_mode(self.mode)
        split, peft_model, _ = cut_module(module, self.cut_layer, self.role, mode.zo_halves,
                                          self._client_split, (self.client_adapter, self.server_adapter),
                                          self.client_frozen, mode.frozen_halves)
        self.peft_model = peft_model or self.peft_model
        self._split = split
        if split.client is not None:
            split.client.stack.checkpointing = self.client_checkpointing
        self.telemetry.install(split)

    def setup_optimizers(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        split, mode = self.split_model, get_mode(self.mode)
        zo_halves = mode.zo_halves
        dtype = getattr(module, "hparams", {}).get("dtype")  # HOSLModule's: named if it is the cause
        if "server" in zo_halves and self.role != "client":
            if module.automatic_optimization:
                raise ValueError(
                    f"mode={self.mode!r} trains both halves without gradients, which a module with automatic "
                    "optimization cannot express; use hosl_lightning.HOSLModule (or mode 'hosl' / 'fo')"
                )
            if getattr(module, "scheduler_factory", None) is not None:
                raise ValueError(
                    f"lr_scheduler is not valid in mode={self.mode!r}: no first-order optimizer is left to schedule "
                    "(one ZOSGD trains both halves); schedule zo_lr with HOSLStrategy(zo_lr_schedule=...)"
                )
            self._zo_optimizers(trainer, self.zo_optimizer_over(split.client, split.server, dtype=dtype))
        elif "client" in zo_halves and self.role == "client":
            # The client's only optimizer is its ZOSGD; registered with Lightning so each step counts once.
            self._zo_optimizers(trainer, self.zo_optimizer_over(split.client, dtype=dtype))
            self.client_optimizer = self.optimizers[0] if "server" not in zo_halves else None
        elif "client" in mode.frozen_halves and self.role == "client":
            self.optimizers, self.lr_scheduler_configs = [NoUpdate()], []  # so that each step counts once
        else:
            super().setup_optimizers(trainer)
            self._fuse_client_update(module)
            if "client" in zo_halves:
                self.client_optimizer = self.zo_optimizer_over(split.client, dtype=dtype)
                self.client_scheduler = zo_lr_scheduler(self.client_optimizer, self.zo_lr_schedule,
                                                        trainer.estimated_stepping_batches)
        self._apply_pending_state()
        if self.mode == "hosl" and self.role == "both" and not module.automatic_optimization:
            # a drop-in module's server steps after the step is logged, and a client process has no server here
            self.predicted_decrease.watch_server(self.optimizers[0])
        if self.role == "client":
            self._start_client_sync()
        self.check_trainer(len(self.parallel_devices or [None]), trainer.accumulate_grad_batches, module.automatic_optimization)

    def _zo_optimizers(self, trainer: Trainer, optimizer: ZOSGD) -> None:
        """A ZOSGD as the one optimizer Lightning counts, with its zo_lr schedule (the module steps it)."""
        scheduler = zo_lr_scheduler(optimizer, self.zo_lr_schedule, trainer.estimated_stepping_batches)
        self.optimizers, self.lr_scheduler_configs = [optimizer], [LRSchedulerConfig(scheduler, interval="step")]

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

    def _in_process_step(self, split: SplitCausalLM, batch: dict[str, Tensor], optimizer: Any, step: int, backward: Any) -> StepOutput:
        """Both halves here (``modes.in_process``), then the optimizers' steps: the one ZO optimizer over both
        halves (zo), or the client's ZO update and the first-order optimizer's step."""
        mode = get_mode(self.mode)
        both_zo = "server" in mode.zo_halves
        zo = optimizer.optimizer if both_zo else self.client_optimizer  # zo: the one ZOSGD over both halves
        output = in_process_step(split, self.mode, batch, self.settings, step, backward, client_optimizer=zo,
                                 server_optimizer=zo if both_zo else None,
                                 grad_scaler=getattr(self.precision_plugin, "scaler", None))
        if both_zo:
            optimizer.step(estimate=output.estimate)
        else:
            if output.estimate is not None:
                assert self.client_optimizer is not None
                with split.client_side():
                    self.client_optimizer.step(estimate=output.estimate)
                self.client_scheduler.step()
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
        split.remote.zo_lr = None if zo is None else zo.param_groups[0]["lr"]  # zo's server half follows it
        context = ClientContext(split, self.settings, step, zo)
        output = get_mode(self.mode).client_step(context, split.remote, StepInputs.of(batch))
        update = None
        if output.estimate is None:
            optimizer.step()
        else:
            optimizer.step(estimate=output.estimate)
            update = ZOUpdate.of(zo, output.estimate)
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
        split, base_step = self.split_model, super().training_step
        self.telemetry.start_step(split)
        output, step = dropin_step(module, split, self.client_optimizer, self.dropin_settings(), self.zo_steps,
                                   lambda: base_step(*args, **kwargs), weight)
        self.client_scheduler.step()
        self.zo_steps += 1
        self._log_step(step.estimate, {"probe_loss": float(step.loss)})  # HOSLModule's train_loss
        return output

    def _log_step(self, estimate: ZOEstimate | None, extra: dict[str, float] | None = None) -> None:
        assert self.lightning_module is not None
        sync = self._client_sync  # with several clients: all that keeping them in step has cost so far
        extra = {**(extra or {}), **({} if sync is None else {"sync_bytes_up": float(sync.bytes_up),
                                                                "sync_bytes_down": float(sync.bytes_down)})}
        if self.mode == "hosl":
            extra.update(self.predicted_decrease.step_metrics(self.client_optimizer))
        metrics = self.telemetry.step_metrics(self.split_model, estimate, self.optimizers[0] if self.optimizers else None,
                                              self._drawing_optimizer(), self.role, extra)
        self.lightning_module.log_dict(prefixed(metrics), on_step=True, on_epoch=False, prog_bar=False)

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
        # Lightning's own backward of a drop-in module's loss: only the server's graph in hosl and frozen (no client
        # weight takes a gradient); in fo one backward runs through both halves at once, so it is shared.
        mode = get_mode(self.mode)
        client_learns_by_backprop = "client" not in (*mode.zo_halves, *mode.frozen_halves)
        with self.telemetry.sides.enter("shared" if client_learns_by_backprop else "server"):
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def serve(self, module: LightningModule) -> int:
        """Serve the clients (rank 0; ``trainer.fit`` calls this through ServerLauncher); the steps served. ``module``
        is the clients' module: the server keeps its half, trains it with the module's optimizer, saves it."""
        if self.role != "server":
            raise RuntimeError(f"serve() runs the server (rank {SERVER_RANK}); this process is the {self.role}")
        name, split, client_zo = load_server_half(module, self.cut_layer, self._server_device or torch.device("cpu"),
                                                  self.client_frozen)
        first_key = client_zo if get_mode(self.mode).zo_halves else 0  # load first, then connect: a slow load never times out
        install_split(module, name, split)
        self._split = split
        self.telemetry.install(split)
        self._connect()  # counts the clients, so the hello the server expects names them
        return serve_half(split, module, self._peers, self.mode, self.settings, self.hello_settings(first_key),
                          lambda named: self.new_zo_optimizer(named, self.seed, first_key), self.schedule,
                          self.server_checkpoint_dir)

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.role == "client":
            # torchrun gives the client RANK=1, which would mute Lightning's rank-zero logging and checkpoints;
            # the client runs the only Trainer, so it is rank zero for them. (It connects at the cut, once loaded.)
            rank_zero_only.rank = 0  # type: ignore[attr-defined]

    def on_train_start(self) -> None:
        super().on_train_start()
        self.predicted_decrease.reset()

    def on_train_end(self) -> None:
        """Says what share of the loss decrease predicted over the fit came from the client's updates."""
        super().on_train_end()
        summary = self.predicted_decrease.summary()
        if summary is not None:
            rank_zero_info(f"hosl: {summary}")

    def on_exception(self, exception: BaseException) -> None:
        """A failing client tells the server why (instead of vanishing mid-protocol) and waits for no one."""
        self._failure = exception
        self.report_failure(exception)
        super().on_exception(exception)

    def teardown(self) -> None:
        self._unfuse_client_update()  # the module's parameters step only inside this strategy's fits
        remote = getattr(self._split, "remote", None)  # a client process's link to its server
        self.close_peers(self._failure, remote.close if remote is not None else None)
        module = self._lightning_module  # on the meta device after a failed start: moving it would hide the error
        self._lightning_module = None if module is not None and any(p.is_meta for p in module.parameters()) else module
        try:
            super().teardown()
        finally:
            self._lightning_module = module

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if STRATEGY_NAME not in strategy_registry:
            strategy_registry.register(STRATEGY_NAME, cls, description="Hybrid-order split learning (hosl-lightning)")


HOSLStrategy.__init__.__doc__ = HOSLStrategy.__doc__  # its own docstring: every option, where users look
HOSLStrategy.register_strategies(StrategyRegistry)
