"""hosl's step when the client optimizer's estimator is ``forward`` (:mod:`hosl_lightning.zo_optimizers.forward_gradient`).

Client half: the tangent forward of query 1 (no dropout, as every probe) sends its unperturbed activations ``h``
up, keeping only its tangent ``J u_1``; dL/dh comes down; ``c_1 = <dL/dh, J u_1>``; then the tangent forwards of
queries 2..Q, each reduced to its ``c_q`` at once. Sending ``h`` from the first tangent forward saves one client
forward a step, and computing the other queries after dL/dh has arrived keeps one tangent alive, not Q.
Server half: fo's, one forward and one backward at ``h`` in the model's own mode; it sends dL/dh down.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hosl_lightning.core.boundary import ClientLink
from hosl_lightning.core.split import CutActivations
from hosl_lightning.core.tangents import forward_with_tangent, projected_gradient
from hosl_lightning.modes import fo
from hosl_lightning.modes.base import ClientContext, StepInputs, StepOutput, ensure_finite, eval_mode

server_step = fo.server_step  # one forward and one backward at h; dL/dh down, from that same forward


def tangent_client_step(ctx: ClientContext, link: ClientLink, inputs: StepInputs) -> StepOutput:
    model, settings, optimizer = ctx.model, ctx.settings, ctx.optimizer
    assert optimizer is not None, "a forward-gradient client needs its ZO optimizer"
    if inputs.input_ids is None:
        raise ValueError("zo_optimizer 'forward_gradient' needs the client's inputs, and a drop-in module reads them "
                         "itself: train with hosl_lightning.HOSLModule")

    def tangent_forward(query: int) -> tuple[CutActivations, Tensor]:
        return forward_with_tangent(optimizer.parameter_directions, model.client, ctx.step, query,
                                    lambda: model.client_forward(inputs.input_ids, inputs.attention_mask))

    link.start("hosl", ctx.step, inputs.targets, 1)
    with eval_mode(model.client):  # every query must see the function whose h the server saw
        first: list[Tensor] = []

        def send() -> CutActivations:
            up, tangent = tangent_forward(0)
            first.append(tangent)
            return up

        sent = link.up(send)
        assert sent is not None, "a forward-gradient client needs its own activations"
        gradient, loss = link.gradient(sent.hidden)
        ensure_finite(ctx.step, "the gradient at the cut (dL/dh)", gradient)
        coefficients = [projected_gradient(gradient, first.pop())]
        coefficients += [projected_gradient(gradient, tangent_forward(q)[1]) for q in range(1, settings.queries)]
    values = ensure_finite(ctx.step, "a projected gradient", torch.cat(coefficients))
    return StepOutput(loss=ensure_finite(ctx.step, "the training loss", loss),
                      estimate=optimizer.estimate(ctx.step, values))
