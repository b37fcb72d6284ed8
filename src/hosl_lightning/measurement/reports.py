"""What a measurement returns: plain dataclasses of bytes, so that results can be logged, saved and compared."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from hosl_lightning.measurement.sides import SIDES

MIB = 2**20


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
