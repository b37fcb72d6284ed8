"""Per-side memory accounting, measured (not estimated): what the client and the server each hold during a step.

Client and server share a process here, so each allocation must be attributed to one of them. Two rules:

- **Ownership** for what persists between steps: a side's parameters, buffers, gradients and optimizer
  state are its own wherever they are created. They are counted exactly from the tensors (optimizer state
  per parameter, so in ``fo`` mode, where one optimizer steps both halves, each half gets its own share).
- **Who is working** for everything else (activations, temporaries): every piece of a step runs inside
  ``SplitCausalLM.client_side()`` or ``server_side()`` (see :mod:`hosl_lightning.steps`). A
  :class:`SideSwitch` tracks which is open: the innermost wins, work outside both is the client's (the
  step functions run on the client), and ``"shared"`` marks work that belongs to neither alone: the one
  optimizer step over both halves in ``fo`` and ``zo`` modes, and in ``fo`` mode with a drop-in module
  Lightning's one backward through both. Their temporaries are counted for neither side; the gradients and
  optimizer state they create are counted by ownership. What crosses the cut is delivered as a copy during
  a measured step, as a wire would, so sender and receiver never share a tensor.

How a side's peak is measured depends on its device:

- **CPU** (``method="tracker"``): torch's ``MemTracker`` (a dispatch mode that sees every tensor created
  while it is on), one per side, each recording only while its side works. It gives the peak and the
  breakdown at the peak by category.
- **CUDA** (``method="cuda"``): the caching allocator's counters (``torch.cuda.memory_allocated``,
  ``max_memory_allocated``, ``reset_peak_memory_stats``), read and reset at every switch of side, so each
  phase of work is measured alone. A side holds its exact persistent bytes plus the net allocations of its
  own phases so far; its peak is the highest of that level plus the rise within one of its phases. This
  works whether the halves share a device or not. It resets the device's peak statistics on measured steps,
  and a library's one-off workspace (e.g. cuBLAS's, on the first matmul) is charged to the side that
  triggered it. The tests check this arithmetic on CPU against the trackers, with a simulated allocator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._pytree import tree_map_only
from typing_extensions import Self

from hosl_lightning.model import SplitCausalLM
from hosl_lightning.options import check_choice
from hosl_lightning.steps import (
    Mode,
    ZOSettings,
    eval_mode,
    fo_step,
    hosl_step,
    zo_step,
)
from hosl_lightning.zo import ZOSGD

Side = Literal["client", "server"]
SIDES: tuple[Side, Side] = ("client", "server")
WORK_SIDES = ("client", "server", "shared")  # "shared": a fused step over both halves, counted for neither
MIB = 2**20

_TOTAL = "Total"  # MemTracker's key of a device's total in its snapshots
_CATEGORIES = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Activation": "activations",
               "Temp": "temporaries", "Optstate": "optimizer_state", "Other": "other"}


# ---- which side is working ---------------------------------------------------------------------------------
class SideSwitch:
    """Which half of the split model is working now: the innermost open :meth:`enter` wins.

    Outside every ``enter`` the work is the client's. Listeners are called as ``listener(old, new)`` at every
    change of side. :meth:`install` makes a model's ``client_side`` / ``server_side`` factories enter it.
    """

    DEFAULT = "client"

    def __init__(self) -> None:
        self._open: list[str] = []
        self.listeners: list[Callable[[str, str], None]] = []

    @property
    def current(self) -> str:
        return self._open[-1] if self._open else self.DEFAULT

    @contextmanager
    def enter(self, side: str) -> Iterator[None]:
        check_choice("side", side, WORK_SIDES)
        before = self.current
        self._open.append(side)
        if side != before:
            self._notify(before, side)
        try:
            yield
        finally:
            self._open.pop()
            if self.current != side:
                self._notify(side, self.current)

    def _notify(self, old: str, new: str) -> None:
        for listener in list(self.listeners):
            listener(old, new)

    def install(self, model: SplitCausalLM) -> None:
        model.client_side = partial(self.enter, "client")
        model.server_side = partial(self.enter, "server")


# ---- results -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientMemory:
    """Bytes held by the client at its peak during one training step, by category, all at the moment of the peak.

    Gradients of the client's parameters count as ``grads`` and the state its optimizer keeps as
    ``optimizer_state``; whatever else a backward or an optimizer step allocates is ``temporaries``, and
    whatever a forward allocates is ``activations``.
    """

    peak: int
    params: int
    buffers: int
    grads: int
    activations: int
    temporaries: int
    optimizer_state: int
    other: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class SideMemory:
    """Bytes one side (client or server) held during one training step.

    ``peak`` is measured: the most the side held at once. ``params``, ``buffers``, ``grads`` and
    ``optimizer_state`` are counted exactly from the tensors the side owns (gradients and optimizer state:
    the most held at once during the step). ``activations``, ``temporaries`` and ``other`` are what the side
    held at its peak: on CPU the tracker's categories (forward tensors; backward and optimizer-step
    temporaries; anything else); on CUDA ``activations`` is the whole of the peak above the side's
    persistent bytes at the start of the phase that peaked (activations, temporaries and gradients created
    in that phase, which the allocator cannot tell apart) and the other two are 0.
    """

    peak: int
    params: int
    buffers: int
    grads: int
    activations: int
    temporaries: int
    optimizer_state: int
    other: int
    device: str
    method: Literal["tracker", "cuda"]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mib(self) -> dict[str, float]:
        """The byte fields in MiB."""
        return {name: getattr(self, name) / MIB for name in _BYTE_FIELDS}


_BYTE_FIELDS = tuple(f.name for f in fields(SideMemory) if f.name not in ("device", "method"))


@dataclass(frozen=True)
class MemoryReport:
    """Both sides' memory during training step ``step`` (0-based, ``trainer.global_step`` when it started)."""

    step: int
    mode: str
    client: SideMemory
    server: SideMemory

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """What the strategy logs (under ``hosl/memory/``): peak, params, grads, optimizer state, activations."""
        out: dict[str, float] = {"step": float(self.step)}
        for side in SIDES:
            memory: SideMemory = getattr(self, side)
            for key, name in (("peak", "peak"), ("params", "params"), ("grads", "grads"),
                              ("optimizer", "optimizer_state"), ("activations", "activations")):
                out[f"{side}_{key}_mib"] = getattr(memory, name) / MIB
        return out


# ---- exact counts by ownership -------------------------------------------------------------------------------
_CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block: what a CUDA tensor really takes, as MemTracker counts


def _storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tensor and its views count once)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        size = storage.nbytes()
        if t.device.type == "cuda":
            size = -(-size // _CUDA_BLOCK) * _CUDA_BLOCK
        seen[(t.device, storage.data_ptr())] = size
    return sum(seen.values())


class _Owned:
    """What each side owns (its halves' parameters and buffers, their gradients and optimizer state), in bytes."""

    def __init__(self, model: SplitCausalLM, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.params = {"client": list(model.client.parameters()), "server": list(model.server.parameters())}
        self.buffers = {"client": list(model.client.buffers()), "server": list(model.server.buffers())}
        self.owner = {id(p): side for side in reversed(SIDES) for p in self.params[side]}  # a shared one: the client's
        self.optimizers = list(optimizers)

    def state_tensors(self, side: str) -> Iterator[Tensor]:
        for optimizer in self.optimizers:
            for param, state in optimizer.state.items():
                if self.owner.get(id(param)) == side:
                    yield from (v for v in state.values() if isinstance(v, Tensor))

    def counts(self, side: str) -> dict[str, int]:
        return {
            "params": _storage_bytes(self.params[side]),
            "buffers": _storage_bytes(self.buffers[side]),
            "grads": _storage_bytes(p.grad for p in self.params[side] if p.grad is not None),
            "optimizer_state": _storage_bytes(self.state_tensors(side)),
        }


# ---- CPU: one MemTracker per side ------------------------------------------------------------------------------
class _Tracker(MemTracker):
    """MemTracker reduced to what is measured here: one side's device peak by category.

    Its per-module snapshots cannot follow a module called several times per step (2Q probe forwards) and
    install gradient hooks that fail on frozen parameters, so the module hooks are switched off. Parameters
    are registered up front with ``track_external``. New tensors are classed as activations, or as
    temporaries in a backward or an optimizer step; gradients and optimizer state of the parameters in
    ``owned`` are reclassed as such when they appear, whoever is working (ownership). While ``active`` is
    False the tracker lets everything pass unseen: the other side is working.
    """

    def __init__(self, owned: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.active = True
        self._owned = list(owned)
        self._owned_ids = {id(p) for p in self._owned}
        self._grad_handles: list[Any] = []

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: object) -> None:
        pass

    def _post_fw_hook(self, module: torch.nn.Module, inputs: object, outputs: object) -> None:
        pass

    def _pre_bw_hook(self, module: torch.nn.Module, args: object) -> None:
        pass

    def _post_bw_hook(self, module: torch.nn.Module, args: object) -> None:
        pass

    def __enter__(self) -> Self:
        if self._depth == 0:
            for param in self._owned:
                if param.requires_grad:
                    self._grad_handles.append(param.register_post_accumulate_grad_hook(self._grad_accumulated))
        super().__enter__()
        return self

    def __exit__(self, *args: object) -> None:
        super().__exit__(*args)
        if self._depth == 0:
            for handle in self._grad_handles:
                handle.remove()
            self._grad_handles.clear()

    def _grad_accumulated(self, param: Tensor) -> None:
        if param.grad is not None:
            self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            self._update_peak()

    def _register_global_optimizer_hook(self) -> None:
        """As MemTracker's, except that a closure passed to ``step`` (Lightning's automatic optimization runs
        the whole training step in one) is not inside the optimizer step: its forward makes activations."""

        def before_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            self._in_opt = True
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
            if closure is None:
                return None

            def closure_outside_step() -> Any:
                self._in_opt = False
                try:
                    return closure()
                finally:
                    self._in_opt = True

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_outside_step}
            return (args[0], closure_outside_step, *args[2:]), kwargs

        def after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            self._track_optimizer_states(_MemRefType.OPT, optimizer)
            self._in_opt = False

        self._optimizer_hook_handles = (
            register_optimizer_step_pre_hook(before_step),
            register_optimizer_step_post_hook(after_step),
        )

    def _track_optimizer_states(self, reftype: Any, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimizer step: the state of this side's parameters is optimizer state."""
        for param, state in optimizer.state.items():
            if id(param) in self._owned_ids:
                for value in state.values():
                    if isinstance(value, Tensor):
                        self._update_and_maybe_create_winfos(value, reftype)
        self._update_peak()

    def _update_peak(self) -> None:
        """MemTracker's ``_update_peak_stats`` without the per-module part (its hooks are off), and cheaper."""
        for device, snapshot in self._curr_mem_snap.items():
            total = snapshot[_TOTAL]
            if self._peak_mem.get(device, 0) < total:
                self._peak_mem[device], self._peak_mem_snap[device] = total, dict(snapshot)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        if self.active:
            reftype = _MemRefType.TEMP if self._in_opt or self._mod_tracker.is_bw else _MemRefType.ACT
            if isinstance(result, Tensor):
                self._track(reftype, result)
            else:
                tree_map_only(Tensor, partial(self._track, reftype), result)
            self._update_peak()
        return result


def _device_snapshot(snapshot: dict[torch.device, dict[Any, int]], device: torch.device) -> dict[Any, int]:
    for key, value in snapshot.items():
        if key.type == device.type and (device.index is None or key.index in (None, device.index)):
            return value
    return {}


def _peak_of(tracker: MemTracker, device: torch.device) -> ClientMemory:
    peak = _device_snapshot(tracker.get_tracker_snapshot("peak"), device)
    return ClientMemory(peak=int(peak.get(_TOTAL, 0)), **{name: int(peak.get(k, 0)) for k, name in _CATEGORIES.items()})


# ---- CUDA: allocator counters per phase ------------------------------------------------------------------------
class CudaCounters:
    """The CUDA caching allocator's counters (an object, so that another allocator can stand in for it)."""

    def allocated(self, device: torch.device) -> int:
        return torch.cuda.memory_allocated(device)

    def peak(self, device: torch.device) -> int:
        return torch.cuda.max_memory_allocated(device)

    def reset_peak(self, device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)


class _DeviceLedger:
    """Turns one device's allocator counters, read at every switch of side, into each side's peak.

    A side holds its persistent bytes (counted exactly, by ownership) plus ``transient``: the net allocations
    of its own phases, less the persistent bytes created in them. Its peak is the highest of that level, or
    of the level at the start of one of its phases plus the counters' rise within that phase. Phases of
    other sides, and shared ones, move no side's transient bytes.
    """

    def __init__(self, counters: CudaCounters, device: torch.device, sides: Sequence[str], working: str,
                 persistent: dict[str, int]) -> None:
        self.counters, self.device, self.sides = counters, device, list(sides)
        self.transient = dict.fromkeys(self.sides, 0)
        self.peak = {s: persistent[s] for s in self.sides}
        self.activations = dict.fromkeys(self.sides, 0)
        self._open(working, persistent)

    def _open(self, working: str, persistent: dict[str, int]) -> None:
        self.working, self.persistent = working, {s: persistent[s] for s in self.sides}
        self.start = self.counters.allocated(self.device)
        self.counters.reset_peak(self.device)

    def _candidate(self, side: str, held: int, persistent: int) -> None:
        if held > self.peak[side]:
            self.peak[side], self.activations[side] = held, max(held - persistent, 0)

    def switch(self, new: str, persistent: dict[str, int]) -> None:
        end, top = self.counters.allocated(self.device), self.counters.peak(self.device)
        side = self.working
        if side in self.sides:
            base = self.persistent[side]
            self._candidate(side, base + self.transient[side] + top - self.start, base)
            created = sum(persistent[s] - self.persistent[s] for s in self.sides)
            self.transient[side] = max(self.transient[side] + end - self.start - created, 0)
        for s in self.sides:
            self._candidate(s, persistent[s] + self.transient[s], persistent[s])
        self._open(new, persistent)


# ---- the meter -------------------------------------------------------------------------------------------------
class StepMemoryMeter:
    """Measures what each side holds while it is open (one training step): ``with meter: <step>``.

    ``model``'s ``client_side`` / ``server_side`` must enter ``switch`` (:meth:`SideSwitch.install`).
    ``optimizers``: every optimizer whose state the sides hold (state is attributed per parameter).
    ``method``: ``"auto"`` (the CUDA counters for a side on a CUDA device, the tracker otherwise),
    ``"tracker"`` or ``"cuda"`` (``counters`` stands in for the CUDA allocator). See the module docstring.
    """

    def __init__(
        self,
        model: SplitCausalLM,
        switch: SideSwitch,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        sides: Sequence[Side] = SIDES,
        method: Literal["auto", "tracker", "cuda"] = "auto",
        counters: CudaCounters | None = None,
    ) -> None:
        self.model, self.switch, self.optimizers, self.sides = model, switch, list(optimizers), tuple(sides)
        self.method, self.counters = method, counters or CudaCounters()
        self.trackers: dict[str, _Tracker] = {}
        self.ledgers: dict[torch.device, _DeviceLedger] = {}
        self._stack: ExitStack | None = None

    def device_of(self, side: str) -> torch.device:
        return self.model.boundary.client_device if side == "client" else self.model.boundary.server_device

    def method_of(self, side: str) -> Literal["tracker", "cuda"]:
        if self.method == "auto":
            return "cuda" if self.device_of(side).type == "cuda" else "tracker"
        return self.method

    def __enter__(self) -> Self:
        self._owned = _Owned(self.model, self.optimizers)
        counts = {side: self._owned.counts(side) for side in SIDES}
        self._fixed = {side: (counts[side]["params"], counts[side]["buffers"]) for side in SIDES}
        self._most = {side: dict(counts[side]) for side in SIDES}
        self._copy_on_send, self.model.boundary.copy_on_send = self.model.boundary.copy_on_send, True
        self._stack = ExitStack()
        try:
            working = self.switch.current
            halves = {"client": self.model.client, "server": self.model.server}
            cuda_devices = []
            for side in self.sides:
                if self.method_of(side) == "cuda":
                    cuda_devices.append(self.device_of(side))
                    continue
                tracker = _Tracker(self._owned.params[side])
                tracker.track_external(halves[side])
                for optimizer in self.optimizers:
                    tracker._track_optimizer_states(_MemRefType.OPT, optimizer)
                tracker.active = working == side
                self._stack.enter_context(tracker)
                self.trackers[side] = tracker
            persistent = {side: self._persistent(counts[side]) for side in SIDES}
            for device in dict.fromkeys(cuda_devices):  # each device's ledger follows every side on it
                sides = [side for side in SIDES if self.device_of(side) == device]
                self.ledgers[device] = _DeviceLedger(self.counters, device, sides, working, persistent)
        except BaseException:
            self._close()
            raise
        self.switch.listeners.append(self._on_switch)
        return self

    def __exit__(self, *exc: object) -> None:
        self.switch.listeners.remove(self._on_switch)
        try:
            persistent = self._note()
            for ledger in self.ledgers.values():
                ledger.switch(self.switch.current, persistent)
        finally:
            self._close()

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.model.boundary.copy_on_send = self._copy_on_send

    @staticmethod
    def _persistent(counts: dict[str, int]) -> int:
        return sum(counts.values())

    def _note(self) -> dict[str, int]:
        """Counts what each side owns now, keeps the most gradients and optimizer state seen, returns the totals."""
        persistent = {}
        for side in SIDES:
            counts = self._owned.counts(side)
            for key in ("grads", "optimizer_state"):
                self._most[side][key] = max(self._most[side][key], counts[key])
            persistent[side] = self._persistent(counts)
        return persistent

    def _on_switch(self, old: str, new: str) -> None:
        for side, tracker in self.trackers.items():
            tracker.active = new == side
        persistent = self._note()
        for ledger in self.ledgers.values():
            ledger.switch(new, persistent)

    def result(self, side: Side) -> SideMemory:
        """The side's memory over the measured step (call after the ``with`` block)."""
        params, buffers = self._fixed[side]
        device = self.device_of(side)
        exact = {"params": params, "buffers": buffers, "grads": self._most[side]["grads"],
                 "optimizer_state": self._most[side]["optimizer_state"]}
        if side in self.trackers:
            at_peak = self.peak_breakdown(side)
            return SideMemory(peak=at_peak.peak, activations=at_peak.activations, temporaries=at_peak.temporaries,
                              other=at_peak.other, device=str(device), method="tracker", **exact)
        ledger = self.ledgers[device]
        return SideMemory(peak=ledger.peak[side], activations=ledger.activations[side], temporaries=0, other=0,
                          device=str(device), method="cuda", **exact)

    def peak_breakdown(self, side: Side) -> ClientMemory:
        """The tracker's categories at the side's peak (CPU method only)."""
        return _peak_of(self.trackers[side], self.device_of(side))

    def report(self, step: int, mode: str) -> MemoryReport:
        return MemoryReport(step=step, mode=mode, client=self.result("client"), server=self.result("server"))


# ---- stand-alone measurements (benchmarks, examples) ------------------------------------------------------------
def measure_client_step(
    model: SplitCausalLM,
    batch: dict[str, Tensor],
    mode: Mode,
    settings: ZOSettings | None = None,
    client_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
) -> ClientMemory:
    """Run one step of ``mode`` and return the client's peak memory during it, by category at the peak (two
    steps for ``fo``, so its optimizer state exists, as in every step after the first). Measured with the
    tracker on any device. It changes the weights: use a throwaway model.
    """
    client_params = [p for p in model.client.parameters()]
    switch = SideSwitch()
    saved = model.client_side, model.server_side
    switch.install(model)
    try:
        for p in client_params:
            p.requires_grad_(mode == "fo")
        meter = StepMemoryMeter(model, switch, sides=("client",), method="tracker")
        if mode == "fo":
            optimizer = client_optimizer(client_params)
            with meter:
                for _ in range(2):
                    fo_step(model, batch, backward=lambda loss: loss.backward())
                    with model.client_side():
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as in training
        else:
            zo = ZOSGD(model.client.named_parameters(), lr=0.0)
            with meter:
                if mode == "hosl":
                    hosl_step(model, batch, zo, settings or ZOSettings(), 0, backward=lambda loss: loss.backward())
                else:
                    zo_step(model, batch, zo, settings or ZOSettings(), 0, apply=partial(_client_step, model, zo))
    finally:
        model.client_side, model.server_side = saved
    return meter.peak_breakdown("client")


def _client_step(model: SplitCausalLM, optimizer: ZOSGD, estimate: Any) -> None:
    with model.client_side():
        optimizer.step(estimate=estimate)


def measure_client_inference(model: SplitCausalLM, batch: dict[str, Tensor]) -> ClientMemory:
    """The floor: the client's weights plus one no-grad forward's working set."""
    tracker = _Tracker(model.client.parameters())
    tracker.track_external(model.client)
    with tracker, torch.no_grad(), eval_mode(model):
        model.client_forward(batch["input_ids"], batch.get("attention_mask"))
    return _peak_of(tracker, model.client_device)
