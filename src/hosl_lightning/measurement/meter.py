"""The meter: measures what each side holds during one training step, by the method that fits its device."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Literal

import torch
from typing_extensions import Self

from hosl_lightning.measurement.cuda import CudaCounters, DeviceLedger
from hosl_lightning.measurement.ownership import OwnedBytes
from hosl_lightning.measurement.reports import ClientMemory, MemoryReport, SideMemory
from hosl_lightning.measurement.sides import SIDES, Side, SideSwitch

if TYPE_CHECKING:
    from hosl_lightning.core.split_model import SplitCausalLM
    from hosl_lightning.measurement.tracker import SideTracker


class StepMemoryMeter:
    """Measures what each side holds while it is open (one training step): ``with meter: <step>``.

    ``model``'s ``client_side`` / ``server_side`` must enter ``switch`` (:meth:`SideSwitch.install`).
    ``optimizers``: every optimizer whose state the sides hold (state is attributed per parameter).
    ``method``: ``"auto"`` (the CUDA counters for a side on a CUDA device, the tracker otherwise),
    ``"tracker"`` or ``"cuda"`` (``counters`` stands in for the CUDA allocator). See :mod:`hosl_lightning.measurement`.
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
        self.trackers: dict[str, SideTracker] = {}
        self.ledgers: dict[torch.device, DeviceLedger] = {}
        self._stack: ExitStack | None = None

    def device_of(self, side: str) -> torch.device:
        return self.model.boundary.client_device if side == "client" else self.model.boundary.server_device

    def method_of(self, side: str) -> Literal["tracker", "cuda"]:
        if self.method == "auto":
            return "cuda" if self.device_of(side).type == "cuda" else "tracker"
        return self.method

    def __enter__(self) -> Self:
        self._owned = OwnedBytes(self.model, self.optimizers)
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
                # only now, as a side is measured on CPU: torch's private MemTracker
                from hosl_lightning.measurement.tracker import SideTracker

                tracker = SideTracker(self._owned.params[side])
                tracker.track_external(halves[side])
                for optimizer in self.optimizers:
                    tracker.track_optimizer_state(optimizer)
                tracker.active = working == side
                self._stack.enter_context(tracker)
                self.trackers[side] = tracker
            persistent = {side: self._persistent(counts[side]) for side in SIDES}
            for device in dict.fromkeys(cuda_devices):  # each device's ledger follows every side on it
                sides = [side for side in SIDES if self.device_of(side) == device]
                self.ledgers[device] = DeviceLedger(self.counters, device, sides, working, persistent)
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
        tracker = self.trackers[side]
        # loaded already, since the side has a tracker
        from hosl_lightning.measurement.tracker import peak_of

        return peak_of(tracker, self.device_of(side))

    def report(self, step: int, mode: str) -> MemoryReport:
        """Both sides' memory over the measured step ``step`` of ``mode`` (call after the ``with`` block)."""
        return MemoryReport(step=step, mode=mode, client=self.result("client"), server=self.result("server"))
