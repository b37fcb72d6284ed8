"""CPU measurement: torch's ``MemTracker``, one per side, recording only while its side works.

``MemTracker`` is a private torch tool (a dispatch mode that sees every tensor created while it is on), so it
is imported only here, and this module only when a CPU measurement is made: importing the package needs none
of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._pytree import tree_map_only
from typing_extensions import Self

from hosl_lightning.measurement.reports import ClientMemory

try:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from torch.distributed._tools.mod_tracker import ModTracker
except ImportError as error:  # a torch too old for it, or one built without torch.distributed
    raise ImportError(
        f"measuring memory on CPU needs torch's MemTracker (torch.distributed._tools.mem_tracker), which torch "
        f"{torch.__version__} lacks: install a torch that has it, or measure only sides on CUDA (method='cuda')"
    ) from error



class _QuietModTracker(ModTracker):
    """torch's ModTracker without its false alarm: it names a module that has no parent in the tree it saw by its
    type, so two distinct modules of one type nested (a split model's halves call blocks of the model they came
    from) read as one module entered twice, and it warns "The module hierarchy tracking maybe be messed up. Please
    file a bug to PyTorch", replacing ``warnings.formatwarning`` for the whole process as it does. Nothing measured
    here reads its per-module hierarchy (only whether backward runs), so the warning is neither true nor
    actionable: it is silenced, and the format put back."""

    def _get_append_fn(self, w_mod: Any, name: str, is_bw: bool) -> Any:
        append = super()._get_append_fn(w_mod, name, is_bw)

        def quiet(*args: Any) -> None:
            format_warning = warnings.formatwarning
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
                try:
                    append(*args)
                finally:
                    warnings.formatwarning = format_warning

        return quiet


_TOTAL = "Total"  # MemTracker's key of a device's total in its snapshots
_CATEGORIES = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Activation": "activations",
               "Temp": "temporaries", "Optstate": "optimizer_state", "Other": "other"}


class SideTracker(MemTracker):
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
        self._mod_tracker = _QuietModTracker()
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

    def _track(self, reftype: Any, t: Tensor) -> None:
        for part in _stored(t):
            super()._track(reftype, part)

    def _update_and_maybe_create_winfos(self, t: Tensor, reftype: Any, update_existing: bool = False) -> set[Any]:
        return set().union(*(super(SideTracker, self)._update_and_maybe_create_winfos(part, reftype, update_existing)
                             for part in _stored(t)))

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

    def track_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the state ``optimizer`` already holds for this side's parameters as optimizer state."""
        self._track_optimizer_states(_MemRefType.OPT, optimizer)

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


def _stored(tensor: Tensor) -> list[Tensor]:
    """The dense tensors that hold ``tensor``'s memory: a sparse COO tensor (a row-sparse embedding gradient, see
    ``core.fused_update``) has no storage of its own, MemTracker would fail on it: its indices and values."""
    if tensor.layout == torch.sparse_coo:
        return [tensor._indices(), tensor._values()]
    return [tensor]


def _device_snapshot(snapshot: dict[torch.device, dict[Any, int]], device: torch.device) -> dict[Any, int]:
    for key, value in snapshot.items():
        if key.type == device.type and (device.index is None or key.index in (None, device.index)):
            return value
    return {}


def peak_of(tracker: MemTracker, device: torch.device) -> ClientMemory:
    """What ``tracker`` saw held on ``device`` at its peak, by category."""
    peak = _device_snapshot(tracker.get_tracker_snapshot("peak"), device)
    return ClientMemory(peak=int(peak.get(_TOTAL, 0)), **{name: int(peak.get(k, 0)) for k, name in _CATEGORIES.items()})
