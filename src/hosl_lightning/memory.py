"""Client-side memory accounting, measured (not estimated) with torch's device-agnostic MemTracker.

The client and server share a process here, so the server's share of a step is left out of the
client's account: the step's server-side work runs with the tracker disabled (``SplitCausalLM.server_side``)
and the tracker sees only what the client allocates: its weights, activations, gradients, optimizer state
and temporaries. A separate client process (its own peak) is the truest figure once there is one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import _disable_current_modes

from hosl_lightning.model import SplitCausalLM
from hosl_lightning.steps import Mode, ZOSettings, eval_mode, fo_step, hosl_step, zo_step
from hosl_lightning.zo import ZOSGD

_CATEGORIES = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Activation": "activations",
               "Temp": "temporaries", "Optstate": "optimizer_state", "Other": "other"}


class _Tracker(MemTracker):
    """MemTracker reduced to what is measured here: the device peak by category.

    Its per-module snapshots cannot follow a module called several times per step (2Q probe forwards) and
    install gradient hooks that fail on frozen parameters, so the module hooks are switched off. Parameters
    are registered up front with ``track_external``; new tensors are still classed as activations in the
    forward and temporaries in the backward, and optimizer state through the optimizer hooks.
    """

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: object) -> None:
        pass

    def _post_fw_hook(self, module: torch.nn.Module, inputs: object, outputs: object) -> None:
        pass

    def _pre_bw_hook(self, module: torch.nn.Module, args: object) -> None:
        pass

    def _post_bw_hook(self, module: torch.nn.Module, args: object) -> None:
        pass


@dataclass(frozen=True)
class ClientMemory:
    """Bytes held by the client at its peak during one training step, by category."""

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


def measure_client_step(
    model: SplitCausalLM,
    batch: dict[str, Tensor],
    mode: Mode,
    settings: ZOSettings = ZOSettings(),
    client_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
) -> ClientMemory:
    """Run one step of ``mode`` and return the client's peak memory during it (two steps for ``fo``, so its
    optimizer state exists, as in every step after the first). It changes the weights: use a throwaway model.
    """
    device = model.client_device
    client_params = [p for p in model.client.parameters()]
    tracker = _Tracker()
    tracker.track_external(model.client)
    model.server_side = _disable_current_modes
    model.boundary.copy_on_send = True  # as over a wire: what the server receives is not the client's memory
    try:
        for p in client_params:
            p.requires_grad_(mode == "fo")
        if mode == "fo":
            optimizer = client_optimizer(client_params)
            with tracker:
                for _ in range(2):
                    fo_step(model, batch, backward=lambda loss: loss.backward())
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as in training
        else:
            zo = ZOSGD(model.client.named_parameters(), lr=0.0)
            with tracker:
                if mode == "hosl":
                    hosl_step(model, batch, zo, settings, 0, backward=lambda loss: loss.backward())
                else:
                    zo_step(model, batch, zo, settings, 0, apply=lambda e: zo.step(estimate=e))
    finally:
        model.server_side = nullcontext
        model.boundary.copy_on_send = False
    return _peak_of(tracker, device)


def measure_client_inference(model: SplitCausalLM, batch: dict[str, Tensor]) -> ClientMemory:
    """The floor: the client's weights plus one no-grad forward's working set."""
    tracker = _Tracker()
    tracker.track_external(model.client)
    with tracker, torch.no_grad(), eval_mode(model):
        model.client_forward(batch["input_ids"], batch.get("attention_mask"))
    return _peak_of(tracker, model.client_device)


def _peak_of(tracker: MemTracker, device: torch.device) -> ClientMemory:
    peak = tracker.get_tracker_snapshot("peak").get(device, {})
    return ClientMemory(peak=int(peak.get("Total", 0)), **{name: int(peak.get(k, 0)) for k, name in _CATEGORIES.items()})
