"""Exact counts by ownership: what persists between steps (weights, gradients, optimizer state) is its side's
wherever it was created, so it is counted from the tensors rather than measured."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hosl_lightning.measurement.sides import SIDES

if TYPE_CHECKING:
    from hosl_lightning.core.split_model import SplitCausalLM

_CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block: what a CUDA tensor really takes, as MemTracker counts


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tensor and its views count once)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        size = storage.nbytes()
        if t.device.type == "cuda":
            size = -(-size // _CUDA_BLOCK) * _CUDA_BLOCK
        seen[(t.device, storage.data_ptr())] = size
    return sum(seen.values())


class OwnedBytes:
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
            "params": storage_bytes(self.params[side]),
            "buffers": storage_bytes(self.buffers[side]),
            "grads": storage_bytes(p.grad for p in self.params[side] if p.grad is not None),
            "optimizer_state": storage_bytes(self.state_tensors(side)),
        }
