"""zo: all-zeroth-order split learning (MeZO over the split model), the other baseline.

One seed perturbs both halves: the client half perturbs its weights around each probe's client forward, the
server half perturbs its own around that probe's loss, with the direction keys continuing the client's, so
the pair draws exactly what one optimizer over the whole model would. Both halves apply the same estimate.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from hosl_lightning.core.boundary import ClientLink, Reply, Targets, Uplink
from hosl_lightning.modes.base import (
    ZO_OPTIONS,
    ClientContext,
    Mode,
    ServerContext,
    StepInputs,
    StepOutput,
    ZOSettings,
    ensure_finite,
    eval_mode,
    send_probes,
)


def probes(settings: ZOSettings) -> int:
    return len(settings.points())


def client_step(ctx: ClientContext, link: ClientLink, inputs: StepInputs) -> StepOutput:
    settings, optimizer = ctx.settings, ctx.optimizer
    assert optimizer is not None, "a zo client needs its ZO optimizer"
    link.start("zo", ctx.step, inputs.targets, probes(settings))
    send_probes(ctx, link, inputs, half=True, with_fields=True)
    values, _ = link.losses(probes(settings))
    values = ensure_finite(ctx.step, "a probe loss", values.detach().float().reshape(-1))
    coefficients = ensure_finite(ctx.step, "a projected gradient", optimizer.coefficients(values, settings.mu))
    return StepOutput(loss=values.mean(), estimate=optimizer.estimate(ctx.step, coefficients))


def server_step(ctx: ServerContext, uplink: Uplink, targets: Targets, step: int) -> Reply:
    model, settings, optimizer = ctx.model, ctx.settings, ctx.optimizer
    assert optimizer is not None, "a zo server needs the ZOSGD that perturbs its half"
    count, values = probes(settings), []
    with eval_mode(model.server), torch.no_grad():
        for index, (query, sign) in enumerate(settings.points()):
            up, fields = uplink.receive(f"probe {index + 1} of {count}")
            if (fields.get("query"), fields.get("sign")) != (query, sign):
                raise ValueError(f"probe {index + 1} arrived as (query, sign) = "
                                 f"({fields.get('query')}, {fields.get('sign')}), expected ({query}, {sign})")
            perturbation = optimizer.perturbed([model.server], step, query, sign * settings.mu, half=True)
            with perturbation if sign else nullcontext():
                values.append(model.server_losses(up, targets))
    losses = torch.cat(values).float()
    return {"losses": losses, "loss": losses.mean()}


MODE = Mode(name="zo", zo_halves=("client", "server"), client_step=client_step, server_step=server_step,
            reply="losses", probes=probes, options=ZO_OPTIONS)
