"""CUDA measurement: the caching allocator's counters, read and reset at every switch of side.

Each phase of work is so measured alone; a side holds its exact persistent bytes plus the net allocations of
its own phases, whether the halves share a device or not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CudaCounters:
    """The CUDA caching allocator's counters (an object, so that another allocator can stand in for it)."""

    def allocated(self, device: torch.device) -> int:
        return torch.cuda.memory_allocated(device)

    def peak(self, device: torch.device) -> int:
        return torch.cuda.max_memory_allocated(device)

    def reset_peak(self, device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)


class DeviceLedger:
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
