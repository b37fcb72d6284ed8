"""The options of a split run and their checks.

:class:`RunSettings` is the part of :class:`~hosl_lightning.lightning.strategy.HOSLStrategy` that knows the
options: each is checked when the strategy is built, with the option, the value and the valid ones named. What
they make of this process (its role, its peers, the clients' sync) is :mod:`.processes`'s.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from hosl_lightning.core.options import check_bool, check_choice, check_int, check_number
from hosl_lightning.core.zo import DIRECTIONS, EMBEDDING_DIRECTIONS, ZO_LR_SCHEDULES
from hosl_lightning.distributed.peers import BACKENDS
from hosl_lightning.distributed.sync import CLIENT_SYNCS, SCHEDULES, check_stateless
from hosl_lightning.lightning.option_use import UNSET, refuse_unused
from hosl_lightning.models import adapter_config
from hosl_lightning.modes import MODES, SERVER_GRADS, ZOSettings
from hosl_lightning.zo_optimizers import zo_optimizer_spec

STRATEGY_NAME = "hosl"
TRANSPORTS: tuple[str, ...] = ("in_process", "distributed")


class RunSettings:
    """The options of a split run (checked when the strategy is built) and what they make of this process.

    Options that only some modes read (``q``, ``mu``, the ``zo_*`` options, ``embedding_directions``,
    ``pair_probes``, ``direction``, ``seed``: the zeroth-order side's, read in ``hosl`` and ``zo``; ``server_grad``
    and ``batch_probes``: ``hosl``'s; ``client_checkpointing`` and ``fused_client_update``: ``fo``'s) default to None, "unset", which stands for the default named below. One that
    is set while the chosen mode or ``zo_optimizer`` does not use it is refused, naming both, never ignored.

    Args:
        cut_layer: the client runs the embeddings and decoder blocks ``[0, cut_layer)``; the server the rest.
        mode: ``"hosl"`` (ZO client, FO server), ``"fo"`` (first-order split learning baseline: the server
            returns dL/dh), ``"zo"`` (both halves zeroth-order with one shared seed, MeZO over the split model) or
            ``"frozen"`` (the client never learns: one forward a step, no probes; the server learns by backprop, and
            only the loss comes back; the ZO options do not apply and are refused).
        q: number of random directions (queries) per step (unset: 1). Each costs two client forwards with the
            two-point optimizers (``zo_sgd``, ``zo_momentum``: +mu and -mu) and one with ``fzoo`` (+mu; fzoo adds one
            unperturbed forward per step).
        mu: smoothing radius (unset: 1e-3): how far each probe moves the weights along its direction, +-mu for the
            two-point estimate, +mu for fzoo's one-sided one.
        zo_lr: learning rate of the zeroth-order updates (the client in hosl mode, both halves in zo mode; unset: 1e-6).
        zo_weight_decay: decoupled weight decay of the ZO updates; biases and norm weights are exempt (unset: 0).
        zo_lr_schedule: ``"constant"`` (the paper's, unset), ``"linear"`` or ``"cosine"``: ``zo_lr`` decayed to 0 over
            the fit's steps (``trainer.estimated_stepping_batches``); checkpointed and resumed with the run.
        zo_optimizer: the zeroth-order optimizer (the client's in hosl, both halves' in zo): a name or
            ``{name: ..., <option>: ...}``. ``"zo_sgd"`` (the default: the paper's ZO-SGD, two-point), ``"fzoo"``
            (one-sided, Q + 1 forwards, step divided by the spread of the losses; needs q >= 2),
            ``{name: zo_momentum, momentum: 0.9}`` (one buffer of d_c floats; no seed sync) or
            ``"forward_gradient"`` (hosl only: exact projected gradients <dL/dh, J u_q> from Q forward-mode client
            forwards and one server forward and backward; no ``mu``; not with a drop-in module). See
            :mod:`hosl_lightning.zo_optimizers` and README, "Choosing the client optimizer".
        embedding_directions: ``"dense"`` (the paper's, unset: a direction over the whole token-embedding table) or
            ``"sparse"`` (only the rows the step's probes read; unbiased, since the gradient is zero on every other
            row, with the table's share of d_c gone from the variance, and an update that costs those rows only;
            ``zo_weight_decay`` > 0 still decays every row). Plain ``nn.Embedding`` tables only; others (OPT's
            learned positions) stay dense.
        pair_probes: run a query's +mu and -mu probes as one client forward of the batch twice over, each
            direction drawn once for both: faster probes, for the activations of a doubled batch. ``False`` (unset)
            runs them one after the other, drawing twice, and keeps the client at the inference floor. Two-point
            optimizers only (fzoo has no +-mu pairs); a drop-in module runs its probes one at a time and refuses True.
        direction: ``"gaussian"`` (unset) or ``"rademacher"`` directions.
        seed: base seed of the directions (unset: 0); direction q of step t is drawn from hash(seed, t, q, tensor).
        server_grad: which forward the server's gradient comes from in hosl mode: ``"perturbed"`` (the first
            probe's point, free: the +mu point of query 1, the authors' choice; with ``fzoo`` the unperturbed
            point), ``"mean"`` (all probe points) or ``"clean"``
            (unperturbed client weights; one more client forward).
            Unset: ``"perturbed"``, or ``"clean"`` for a drop-in module (its unperturbed call runs anyway, for the
            loss it logs); a drop-in module refuses the others.
        batch_probes: compute the 2Q server losses in one batched forward (faster) instead of one at a time.
            Unset: batched; a drop-in module runs its probes one at a time and refuses True.
        client_device: the client half's device (e.g. ``"cpu"`` beside ``server_device="cuda:0"``); unset: the
            Trainer's.
        server_device: the server half's device; unset: the Trainer's.
        memory_every_n_steps: measure each side's memory (peak, parameters, gradients, optimizer state, activations)
            on a fit's first two steps and then every n-th; 0 (the default) turns it off. Opt-in: on CUDA a measured
            step resets the device's peak statistics at each switch of halves, clobbering your own
            ``max_memory_allocated`` and Lightning's ``DeviceStatsMonitor``; on CPU it is slower (MemTracker sees
            every tensor). The latest :class:`~hosl_lightning.measurement.MemoryReport` is
            ``strategy.memory_report``, logged under ``hosl/memory/`` (:mod:`hosl_lightning.measurement`).
        transport: ``"in_process"`` (both halves in this process, the default) or ``"distributed"``: client and
            server in separate processes that talk over ``torch.distributed``; rank 0 is the server, rank 1 the
            client, and each process builds and holds only its own half (see README, "Client and server in
            separate processes").
        backend: the ``torch.distributed`` backend of a distributed run: ``"gloo"`` (what None, unset, stands for;
            on both sides) or ``"nccl"`` (one client, GPUs on both sides; untested without a GPU).
        timeout_s: in a distributed run, how long either side waits for the other before an error naming the
            peer and what was awaited. Joining waits at most ``max(timeout_s, 60)`` s (plus 5 s for torch), then
            raises ``PeerUnreachable`` naming the peer, the address and what to check.
        init_method: how a distributed run's processes meet; unset: ``"env://"`` (torchrun's ``MASTER_ADDR/PORT``).
        rank: this process's rank (unset: ``RANK``): 0 is the server, 1..world_size-1 clients, each with its data.
        world_size: the number of processes, server and clients (unset: ``WORLD_SIZE``).
        schedule: with several clients, ``"sequential"`` (they take turns of ``steps_per_turn`` steps, the client
            half passing from one to the next: sequential split learning) or ``"parallel"`` (they train at the
            same time and their halves are averaged every ``sync_every_n_steps`` steps: split-federated learning).
        client_sync: how client halves are kept in step: ``"seeds"`` (the ZO updates travel as (seed, step, lr,
            coefficients) and are replayed: bytes instead of megabytes; needs zo_weight_decay=0) or ``"weights"``
            (the half's weights; the only choice in ``fo`` mode).
        steps_per_turn: the length in steps of a client's turn (``schedule="sequential"``).
        sync_every_n_steps: the length in steps of a round (``schedule="parallel"``).
        server_checkpoint_dir: where the server keeps its half of each client checkpoint (``<name>.server.pt``, on
            the server's disk); a client names only the file, never a path, so no peer can write elsewhere.
        client_adapter: peft adapters on the client's decoder blocks, as a dict of
            ``peft.LoraConfig`` fields (e.g. ``{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}``; add
            ``peft_type`` for another method) or a peft config. A side with adapters trains only them (its base
            weights are frozen: ZO never perturbs them and backprop gives them no gradient); a side without
            trains all its weights. ``strategy.peft_model`` is the PeftModel for saving and merging
            (:mod:`hosl_lightning.models`). In-process runs only; needs ``pip install 'hosl-lightning[peft]'``.
        server_adapter: peft adapters on the server's decoder blocks, as ``client_adapter`` on the client's.
        client_frozen: modules of the client half whose weights do not train, by their names inside it (e.g.
            ``[embeddings.embed_tokens]``: ZO then perturbs the client's blocks only, a smaller d_c). A tied LM
            head is the server's own copy and still trains. An unknown name fails, listing the client's.
        client_checkpointing: activation checkpointing of the client's decoder blocks (``torch.utils.checkpoint``,
            non-reentrant): only each block's input is kept between the forward and the backward pass, and the
            block runs again in the backward pass. The same gradients, for about one block's activations instead
            of all of them. Modes whose client learns by backprop only (``"fo"``; unset: off).
        fused_client_update: step each client parameter inside the backward pass, as soon as its gradient is
            ready, and free that gradient at once (``Tensor.register_post_accumulate_grad_hook``), so the client
            never holds a full gradient. The step is the module's optimizer's, with the hyperparameters (and lr
            schedule) of each parameter's group and its state in that optimizer (checkpointed as usual); the
            weights are the unfused run's. Optimizers ``torch.optim.SGD``, ``Adam`` and ``AdamW``. With plain SGD
            (no momentum, no weight decay) the token-embedding table's gradient is row-sparse (only the rows the
            batch reads). Modes whose client learns by backprop only (``"fo"``), with ``HOSLModule`` (not a
            drop-in module: Lightning's automatic step clips and accumulates gradients that are gone by then),
            and without a GradScaler (``"16-mixed"``: it unscales gradients after the backward pass). Gradient
            clipping and accumulation are refused by Lightning for manual optimization already.
        checkpoint_io: your own ``CheckpointIO`` (or one given as a Trainer plugin), which stores every checkpoint;
            the strategy wraps it so that a distributed run's server saves and loads its half of each with it.
    """

    def _init_settings(self, options: dict[str, Any]) -> None:
        """Check every option (naming the option, the value and the valid ones) and keep it."""
        check_choice("mode", options["mode"], tuple(MODES))
        refuse_unused(options)
        o = SimpleNamespace(**{**options, **{k: v for k, v in UNSET.items() if options[k] is None}})
        check_int("cut_layer", o.cut_layer, 0)
        check_int("q", o.q, 1)
        check_number("mu", o.mu, 0, strict=True)
        check_number("zo_lr", o.zo_lr, 0)
        check_number("zo_weight_decay", o.zo_weight_decay, 0)
        check_choice("zo_lr_schedule", o.zo_lr_schedule, ZO_LR_SCHEDULES)
        check_choice("direction", o.direction, DIRECTIONS)
        check_choice("embedding_directions", o.embedding_directions, EMBEDDING_DIRECTIONS)
        check_bool("pair_probes", o.pair_probes)
        optimizer_class, optimizer_options = zo_optimizer_spec(o.zo_optimizer)
        if (o.world_size or 0) > 2 and o.client_sync == "seeds":  # several clients, known now: refuse at once
            check_stateless(optimizer_class)
        if o.q < optimizer_class.min_queries:
            raise ValueError(f"q={o.q} is not valid with zo_optimizer {optimizer_class.name!r}: it needs "
                             f"q >= {optimizer_class.min_queries}")
        check_int("seed", o.seed, 0)
        if o.server_grad is not None:
            check_choice("server_grad", o.server_grad, SERVER_GRADS)
        check_int("memory_every_n_steps", o.memory_every_n_steps, 0)
        check_choice("transport", o.transport, TRANSPORTS)
        if o.backend is not None:
            check_choice("backend", o.backend, BACKENDS)
        check_number("timeout_s", o.timeout_s, 0, strict=True)
        if o.rank is not None:
            check_int("rank", o.rank, 0)
        if o.world_size is not None:
            check_int("world_size", o.world_size, 2)
        check_choice("schedule", o.schedule, SCHEDULES)
        check_choice("client_sync", o.client_sync, CLIENT_SYNCS)
        check_int("steps_per_turn", o.steps_per_turn, 1)
        check_int("sync_every_n_steps", o.sync_every_n_steps, 1)
        if o.transport == "distributed" and (o.client_adapter is not None or o.server_adapter is not None):
            raise ValueError("client_adapter / server_adapter run in-process only for now: use transport='in_process'")
        for side, spec in (("client", o.client_adapter), ("server", o.server_adapter)):
            if spec is not None:
                adapter_config(spec, side)  # a bad field fails now, not when training starts
        self.client_adapter, self.server_adapter = o.client_adapter, o.server_adapter
        if o.client_frozen is not None and (not isinstance(o.client_frozen, (list, tuple)) or not all(
                isinstance(name, str) for name in o.client_frozen)):
            raise ValueError(f"client_frozen={o.client_frozen!r} is not valid: give a list of module names inside the "
                             "client half, e.g. ['embeddings.embed_tokens']")
        self.client_frozen = None if o.client_frozen is None else list(o.client_frozen)
        for name in ("client_checkpointing", "fused_client_update"):  # fo's (Mode.options): refused elsewhere
            check_bool(name, getattr(o, name))
        self.client_checkpointing, self.fused_client_update = o.client_checkpointing, o.fused_client_update
        self.cut_layer, self.mode = o.cut_layer, o.mode
        # None: the path's own choice (a drop-in module takes its gradient from the clean call it makes anyway).
        self._given = {"server_grad": o.server_grad, "batch_probes": o.batch_probes, "pair_probes": options["pair_probes"]}
        self.settings = ZOSettings(queries=o.q, mu=float(o.mu), server_grad=o.server_grad or "perturbed",
                                   batch_probes=True if o.batch_probes is None else o.batch_probes,
                                   estimator=optimizer_class.estimator, pair_probes=o.pair_probes)
        # one spelling of the choice, so that client and server compare equal however each was written
        self.zo_optimizer = {"name": optimizer_class.name, **optimizer_options}
        self.embedding_directions = o.embedding_directions
        self.zo_lr, self.zo_weight_decay = float(o.zo_lr), float(o.zo_weight_decay)
        self.zo_lr_schedule = o.zo_lr_schedule
        self.direction, self.seed = o.direction, o.seed
        self._client_device, self._server_device = device_option("client_device", o.client_device), device_option(
            "server_device", o.server_device)
        self.memory_every_n_steps = o.memory_every_n_steps
        self.transport = o.transport
        self.schedule, self.client_sync = o.schedule, o.client_sync
        self.steps_per_turn, self.sync_every_n_steps = o.steps_per_turn, o.sync_every_n_steps
        self.server_checkpoint_dir = o.server_checkpoint_dir

    # ---- the drop-in path --------------------------------------------------------------------------------
    def check_trainer(self, devices: int, accumulate_grad_batches: int, automatic_optimization: bool) -> None:
        """Refuse Trainer settings this strategy would otherwise ignore silently."""
        if devices > 1:
            raise ValueError(
                f"devices={devices} is not valid with HOSLStrategy: it runs one process per side. Use devices=1 and "
                "place the halves with client_device / server_device, or run them as separate processes "
                "(transport='distributed')"
            )
        if automatic_optimization and self.mode == "hosl" and accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches={accumulate_grad_batches} is not valid with a drop-in module in mode "
                "'hosl': the client would take a ZO step on every batch while the server steps every "
                f"{accumulate_grad_batches}; use accumulate_grad_batches=1 (and a larger batch, or q)"
            )
        if automatic_optimization and self.fused_client_update:
            raise ValueError(
                "fused_client_update=True is not valid with a drop-in module (automatic optimization): Lightning's "
                "optimizer step would clip or accumulate client gradients that the fused update has already applied "
                "and freed; train with hosl_lightning.HOSLModule, or set fused_client_update=False"
            )
        if automatic_optimization:
            self.check_dropin()

    def check_dropin(self) -> None:
        """A drop-in module's step is opaque: refuse the options it cannot honour, naming why."""
        if self.mode != "hosl":
            return
        if self.settings.estimator == "forward":
            raise ValueError(
                f"zo_optimizer {self.zo_optimizer['name']!r} is not valid with a drop-in module (automatic "
                "optimization): it needs dL/dh at the cut and the client's own forward, and a training_step that runs "
                "the whole model gives neither; train with hosl_lightning.HOSLModule, or choose zo_sgd, fzoo or "
                "zo_momentum"
            )
        server_grad, batch_probes = self._given["server_grad"], self._given["batch_probes"]
        if server_grad not in (None, "clean"):
            raise ValueError(
                f"server_grad={server_grad!r} is not valid with a drop-in module (automatic optimization): its "
                "training_step runs once more, unperturbed, for the loss it logs, and the server's gradient comes "
                "from that call; use server_grad='clean' (or leave it unset), or train with hosl_lightning.HOSLModule"
            )
        if self._given["pair_probes"]:
            raise ValueError(
                "pair_probes=True is not valid with a drop-in module (automatic optimization): each probe is a call "
                "of its own training_step, one batch at a time; leave pair_probes unset (or False), or train with "
                "hosl_lightning.HOSLModule"
            )
        if batch_probes:
            raise ValueError(
                "batch_probes=True is not valid with a drop-in module (automatic optimization): each probe is a call "
                "of its own training_step, which cannot be batched; leave batch_probes unset (or False), or train "
                "with hosl_lightning.HOSLModule"
            )

    def dropin_settings(self) -> ZOSettings:
        return ZOSettings(self.settings.queries, self.settings.mu, "clean", batch_probes=False,
                          estimator=self.settings.estimator, pair_probes=False)


def device_option(name: str, value: str | None) -> torch.device | None:
    """A device option, refused before anything loads when it is not valid or this torch cannot reach it."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}={value!r} is not valid: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r} is not valid: this torch ({torch.__version__}) sees no CUDA device; "
                         "use 'cpu', or install a CUDA build of torch on a machine with a GPU")
    return device
