"""FZOO (Dang et al., 2025, arXiv:2506.09034): one-sided estimates, the step divided by the spread of the losses.

Each step probes the unperturbed point and Q >= 2 directions (Q + 1 client forwards, against 2Q for ZO-SGD)
and moves by ``-lr * (1/Q) sum_q ((L_q - L_0) / sigma) u_q``, where ``sigma`` is the standard deviation of the Q
perturbed losses: larger steps where the loss is flat, smaller where it is steep (the paper shows this is
normalised SGD in zeroth order). Since ``L_q - L_0 ~ mu g.u_q`` and ``sigma ~ mu |g|``, each coefficient is of
order one whatever the scale of the loss or of ``mu``: ``zo_lr`` is then about the size of each weight's step,
as in Adam (1e-6 to 1e-5 for a 135M model), not ZO-SGD's multiplier of a gradient. The paper draws Rademacher
directions (``direction: rademacher``).

Extra client memory: none (stateless). Seed sync: works; the coefficients sent already hold ``1 / sigma``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hosl_lightning.core.zo import ZOSGD


class FZOO(ZOSGD):
    """ZO-SGD over one-sided estimates with the step normalised by the standard deviation of the probe losses."""

    name = "fzoo"
    estimator = "one_sided"
    min_queries = 2  # a standard deviation needs two perturbed losses
    extra_memory = "none"
    strategy_options = ("mu", "server_grad", "batch_probes")  # no +mu/-mu pairs to run as one forward: no pair_probes

    def coefficients(self, losses: Tensor, mu: float) -> Tensor:
        differences = losses[1:] - losses[0]  # L_q - L_0: mu cancels against sigma's
        sigma = losses[1:].float().std()
        if not bool(sigma > 0):  # every perturbed loss equal: no direction is better than another
            return torch.zeros_like(differences)
        return differences / sigma

    def first_order_decrease(self, coefficients: list[float]) -> float | None:
        """None: a coefficient ``(L_q - L_0) / sigma`` is no projected gradient (its scale is gone with sigma)."""
        return None
