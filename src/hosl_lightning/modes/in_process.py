"""Run one step of a mode with both halves in this process: the client half over an in-process link whose
server end is the same mode's server half. Benchmarks, memory measurements and tests call these directly;
:class:`~hosl_lightning.lightning.strategy.HOSLStrategy`'s in-process step calls :func:`in_process_step` with
Lightning's backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from hosl_lightning.core.boundary import InProcessLink, Reply, Targets, Uplink
from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD, ZOEstimate
from hosl_lightning.modes import get_mode
from hosl_lightning.modes.base import ClientContext, ServerContext, StepInputs, StepOutput, ZOSettings


def in_process_step(
    model: SplitCausalLM,
    mode: str,
    batch: dict[str, Tensor],
    settings: ZOSettings,
    step: int,
    backward: Callable[[Tensor], None],
    client_optimizer: ZOSGD | None = None,
    server_optimizer: ZOSGD | None = None,
    grad_scaler: Any = None,
) -> StepOutput:
    """One step of ``mode``: the server's gradients go through ``backward``; no optimizer is stepped here.

    ``grad_scaler``: the GradScaler that ``backward`` scales the loss with (16-mixed), if any."""
    chosen = get_mode(mode)
    server = ServerContext(model, settings, backward, server_optimizer)

    def server_step(name: str, uplink: Uplink, targets: Targets, at_step: int) -> Reply:
        return get_mode(name).server_step(server, uplink, targets, at_step)

    link = InProcessLink(model.boundary, server_step, model.client_side, model.server_side)
    client = ClientContext(model, settings, step, client_optimizer, grad_scaler=grad_scaler)
    return chosen.client_step(client, link, StepInputs.of(batch))


def hosl_step(
    model: SplitCausalLM, batch: dict[str, Tensor], client_optimizer: ZOSGD, settings: ZOSettings, step: int,
    backward: Callable[[Tensor], None],
) -> StepOutput:
    """hosl with both halves here; applies the client's ZO update (the caller steps the server's optimizer)."""
    output = in_process_step(model, "hosl", batch, settings, step, backward, client_optimizer)
    assert output.estimate is not None
    with model.client_side():
        client_optimizer.step(estimate=output.estimate)
    return output


def fo_step(model: SplitCausalLM, batch: dict[str, Tensor], backward: Callable[[Tensor], None]) -> StepOutput:
    """First-order split learning with both halves here (the caller steps the optimizer)."""
    return in_process_step(model, "fo", batch, ZOSettings(), 0, backward)


def zo_step(
    model: SplitCausalLM, batch: dict[str, Tensor], optimizer: ZOSGD, settings: ZOSettings, step: int,
    apply: Callable[[ZOEstimate], Any],
) -> StepOutput:
    """All-ZO split learning with both halves here, ``optimizer`` over both; ``apply`` takes the estimate."""
    output = in_process_step(model, "zo", batch, settings, step, lambda loss: None, optimizer, optimizer)
    assert output.estimate is not None
    apply(output.estimate)
    return output
