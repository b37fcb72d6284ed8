"""Which half's update lowers the loss: each step's first-order predicted decrease, per half, and its share over a fit.

To first order an update ``delta`` lowers the loss by ``-<grad L, delta>``. Each half knows both factors of its own:

- the server, after its optimizer's step, has its gradient and its update, whatever the optimizer (momentum, Adam,
  weight decay): ``<g, theta_before> - <g, theta_after>``, summed chunk by chunk (:func:`gradient_dot_weights`),
  so no copy of its weights is ever kept;
- the client's ZO optimizer predicts its own from its coefficients
  (:meth:`~hosl_lightning.core.zo.ZOSGD.first_order_decrease`: ``lr (1/Q) sum_q c_q^2``, exact with
  ``forward_gradient``, to O(mu^2) with the two-point estimate). ``fzoo`` and ``zo_momentum``, and any client
  with ``zo_weight_decay`` > 0, cannot say theirs from their coefficients: their metric is not logged.

Both gradients are the step's own (the server's from the forward it backpropagated, the client's at its probes),
so the two numbers say what each update was worth on this batch, not on the next.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hosl_lightning.core.zo import ZOSGD

CHUNK = 1 << 16  # elements per dot product in the weights' dtype; the chunks' sums are added in float64


def gradient_dot_weights(params: Iterable[Tensor]) -> float:
    """``sum <p.grad, p>`` over ``params`` that have a gradient.

    Each chunk's dot product runs in the weights' own dtype (a BLAS call, no temporary), and the chunks' results
    are added in float64. The rounding of a chunk is nearly the same before and after a step (the weights barely
    move), so it cancels in the difference that the prediction takes; a float64 product per element instead cost
    ~50x more time on CPU (seconds a step on a 135M model).
    """
    parts: list[Tensor] = []
    for param in params:
        if param.grad is None:
            continue
        gradient, weight = param.grad.detach().reshape(-1), param.detach().reshape(-1)
        parts += [torch.dot(gradient[start:start + CHUNK], weight[start:start + CHUNK])
                  for start in range(0, weight.numel(), CHUNK)]
    return float(torch.stack(parts).double().sum()) if parts else 0.0


class ServerDecrease:
    """Hooks on a first-order optimizer: after each of its steps, ``last`` is ``-<grad, update>`` over its parameters."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.last: float | None = None
        self._before = 0.0
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    @staticmethod
    def _params(optimizer: Optimizer) -> Iterable[Tensor]:
        return (p for group in optimizer.param_groups for p in group["params"])

    def _pre(self, optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
        self._before = gradient_dot_weights(self._params(optimizer))

    def _post(self, optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
        self.last = self._before - gradient_dot_weights(self._params(optimizer))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class PredictedDecrease:
    """The two metrics of each step and their totals over a fit (:meth:`summary`)."""

    def __init__(self) -> None:
        self.server: ServerDecrease | None = None
        self.totals = {"server": 0.0, "client": 0.0}
        self.steps = 0  # steps where both halves predicted theirs

    def watch_server(self, optimizer: Optimizer) -> None:
        if self.server is not None:
            self.server.remove()
        self.server = ServerDecrease(optimizer)

    def reset(self) -> None:
        self.totals, self.steps = {"server": 0.0, "client": 0.0}, 0

    def step_metrics(self, client_optimizer: ZOSGD | None) -> dict[str, float]:
        """This step's predictions, keyed ``predicted_decrease_<half>``; each half's is left out where it is unknown."""
        known = {"server": None if self.server is None else self.server.last,
                 "client": None if client_optimizer is None else client_optimizer.predicted_decrease}
        if self.server is not None:
            self.server.last = None  # a step that does not step the server must not report the last one again
        if client_optimizer is not None:
            client_optimizer.predicted_decrease = None
        if all(value is not None for value in known.values()):
            self.steps += 1
            for half, value in known.items():
                self.totals[half] += float(value)  # type: ignore[arg-type]
        return {f"predicted_decrease_{half}": float(value) for half, value in known.items() if value is not None}

    def summary(self) -> str | None:
        """One line for the end of a fit: the client's share of the decrease both halves predicted."""
        if not self.steps:
            return None
        server, client = self.totals["server"], self.totals["client"]
        share = f"{100 * client / (server + client):.3g}%" if server + client > 0 else "n/a (no decrease predicted)"
        return (f"predicted loss decrease over {self.steps} steps (first order): server {server:.4g}, client "
                f"{client:.4g}; the client contributed {share} of the predicted decrease")
