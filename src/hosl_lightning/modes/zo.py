"""zo: all-zeroth-order split learning (MeZO over the split model), the other baseline.

One seed perturbs both halves: the client half perturbs its weights around each probe's client forward, the
server half perturbs its own around that probe's loss, with the direction keys continuing the client's, so
the pair draws exactly what one optimizer over the whole model would. Both halves apply the same estimate.
"""

from __future__ import annotations

import torch

from hosl_lightning.core.boundary import ClientLink, Reply, Targets, Uplink
from hosl_lightning.core.zo import ZOEstimate, projected_gradients
from hosl_lightning.modes.base import (
    ClientContext,
    Mode,
    ServerContext,
    StepInputs,
    StepOutput,
    ZOSettings,
    ensure_finite,
    eval_mode,
)


def probes(settings: ZOSettings) -> int:
    return 2 * settings.queries


def client_step(ctx: ClientContext, link: ClientLink, inputs: StepInputs) -> StepOutput:
    input_ids, attention_mask, targets = inputs.input_ids, inputs.attention_mask, inputs.targets
    model, settings, optimizer = ctx.model, ctx.settings, ctx.optimizer
    assert optimizer is not None, "a zo client needs its ZO optimizer"
    link.start("zo", ctx.step, targets, probes(settings))
    with eval_mode(model.client):
        for query in range(settings.queries):
            for sign in (1.0, -1.0):
                perturbed = optimizer.perturbed([model.client], ctx.step, query, sign * settings.mu, half=True)
                with torch.no_grad(), perturbed:
                    link.up(lambda: model.client_forward(input_ids, attention_mask), query=query, sign=sign)
    values, _ = link.losses(probes(settings))
    values = ensure_finite(ctx.step, "a probe loss", values.detach().float().reshape(-1))
    coefficients = ensure_finite(ctx.step, "a projected gradient (L+ - L-) / 2mu",
                                 projected_gradients(values, settings.mu))
    return StepOutput(loss=values.mean(), estimate=ZOEstimate(ctx.step, coefficients))


def server_step(ctx: ServerContext, uplink: Uplink, targets: Targets, step: int) -> Reply:
    model, settings, optimizer = ctx.model, ctx.settings, ctx.optimizer
    assert optimizer is not None, "a zo server needs the ZOSGD that perturbs its half"
    count, values = probes(settings), []
    with eval_mode(model.server), torch.no_grad():
        for index in range(count):
            up, fields = uplink.receive(f"probe {index + 1} of {count}")
            query, sign = index // 2, (1.0 if index % 2 == 0 else -1.0)
            if (fields.get("query"), fields.get("sign")) != (query, sign):
                raise ValueError(f"probe {index + 1} arrived as (query, sign) = "
                                 f"({fields.get('query')}, {fields.get('sign')}), expected ({query}, {sign})")
            with optimizer.perturbed([model.server], step, query, sign * settings.mu, half=True):
                values.append(model.server_losses(up, targets))
    losses = torch.cat(values).float()
    return {"losses": losses, "loss": losses.mean()}


MODE = Mode(name="zo", zo_halves=("client", "server"), client_step=client_step, server_step=server_step,
            reply="losses", probes=probes)
