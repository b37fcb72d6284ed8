"""hosl: the client learns by zeroth-order estimates (2Q probe forwards, no activations kept), the server by backprop.

Client half: for each probe of the client optimizer's estimator (two-point: +-mu u_q; one-sided: the clean point
and +mu u_q), perturb the client (never writing its weights), run the client forward without autograd and send
the activations up at once; then read back the losses and let the optimizer turn them into Q coefficients. Server half: the 2Q losses without dropout (in
one batched forward when ``batch_probes``), and the server's gradient from the points ``server_grad`` names.
A forward-gradient client (estimator ``forward``) takes dL/dh instead (:mod:`hosl_lightning.modes.forward_gradient`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hosl_lightning.core.boundary import ClientLink, Reply, Targets, Uplink
from hosl_lightning.core.split import CutActivations
from hosl_lightning.core.split_model import SplitCausalLM, concat_activations
from hosl_lightning.modes import forward_gradient
from hosl_lightning.modes.base import (
    ZO_OPTIONS,
    ClientContext,
    Mode,
    ServerContext,
    StepInputs,
    StepOutput,
    ZOSettings,
    dropout_active,
    ensure_finite,
    eval_mode,
    send_probes,
)


def probes(settings: ZOSettings) -> int:
    """Activations per step: the estimator's probes, and the clean point when the server's gradient comes from it
    (a forward-gradient client sends its clean point only)."""
    if settings.estimator == "forward":
        return 1
    return len(settings.points()) + int(settings.server_grad == "clean")


def reply(settings: ZOSettings) -> str:
    """The probes' losses, or dL/dh for a forward-gradient client."""
    return "grad" if settings.estimator == "forward" else "losses"


def client_step(ctx: ClientContext, link: ClientLink, inputs: StepInputs) -> StepOutput:
    model, settings, optimizer = ctx.model, ctx.settings, ctx.optimizer
    if settings.estimator == "forward":
        return forward_gradient.tangent_client_step(ctx, link, inputs)
    assert optimizer is not None, "a hosl client needs its ZO optimizer"
    link.start("hosl", ctx.step, inputs.targets, probes(settings))
    send_probes(ctx, link, inputs)  # each sent at once: the client keeps nothing
    if settings.server_grad == "clean":  # one more client forward, unperturbed, in the model's own mode
        with torch.no_grad():
            link.up(lambda: model.client_forward(inputs.input_ids, inputs.attention_mask), clean=True)
    values, loss = link.losses(len(settings.points()))  # loss: the clean point's with server_grad "clean"
    values = ensure_finite(ctx.step, "a probe loss", values.detach().float().reshape(-1))
    coefficients = ensure_finite(ctx.step, "a projected gradient", optimizer.coefficients(values, settings.mu))
    clean = ensure_finite(ctx.step, "the training loss", loss) if settings.server_grad == "clean" else None
    return StepOutput(loss=values.mean(), estimate=optimizer.estimate(ctx.step, coefficients), clean_loss=clean)


def server_step(ctx: ServerContext, uplink: Uplink, targets: Targets, step: int) -> Reply:
    model, settings, backward = ctx.model, ctx.settings, ctx.backward
    if settings.estimator == "forward":
        return forward_gradient.server_step(ctx, uplink, targets, step)
    count = len(settings.points())
    ups = [uplink.receive(f"probe {index + 1} of {count}")[0] for index in range(count)]
    clean = uplink.receive("the clean activations")[0] if settings.server_grad == "clean" else None
    # With dropout, the gradient needs a training-mode forward of its own; without, the probe forward's graph is it.
    separate = clean is not None or dropout_active(model.server)
    with eval_mode(model.server):
        if separate:
            with torch.no_grad():
                values = _losses(model, ups, targets, settings.batch_probes)
        elif settings.server_grad == "mean":
            values = _losses(model, ups, targets, settings.batch_probes)
            backward(values.mean())
            values = values.detach()
        else:  # "perturbed": the first probe's point, free (two_point: +mu of query 1, the authors' choice)
            first = model.server_losses(ups[0], targets)
            backward(first[0])
            with torch.no_grad():
                values = torch.cat([first.detach(), _losses(model, ups[1:], targets, settings.batch_probes)])
    loss = values.mean()
    if clean is not None:
        clean_loss = model.server_losses(clean, targets)[0]
        backward(clean_loss)
        loss = clean_loss.detach()
    elif separate:
        points = ups[:1] if settings.server_grad == "perturbed" else ups
        backward(_losses(model, points, targets, settings.batch_probes).mean())
    return {"losses": values.float(), "loss": loss.float().reshape(())}


def _losses(model: SplitCausalLM, ups: list[CutActivations], targets: Targets, batched: bool) -> Tensor:
    if not ups:
        return torch.empty(0, device=targets["labels"].device)
    if batched:
        return model.server_losses(concat_activations(ups), targets, groups=len(ups))
    return torch.cat([model.server_losses(up, targets) for up in ups])


MODE = Mode(name="hosl", zo_halves=("client",), client_step=client_step, server_step=server_step, reply="losses",
            probes=probes, reply_for=reply, options=(*ZO_OPTIONS, "server_grad", "batch_probes"))
