"""Forward gradients from the cut: exact projected gradients ``c_q = <dL/dh, J u_q>``, with ZO-SGD's update.

In hosl the server computes dL/dh at the cut for its own backward anyway. The client runs its forward with a
tangent ``u_q`` on its weights (forward-mode AD, :mod:`hosl_lightning.core.tangents`), which gives the
activations ``h`` and ``J u_q`` together; once dL/dh has come down, ``c_q = <dL/dh, J u_q> = <grad L, u_q>``,
exactly, with no ``mu``. The update is ZO-SGD's, ``-lr (1/Q) sum_q c_q u_q`` over the same seeded directions
(dense, or sparse embedding rows), so seed sync replays it and checkpoints hold nothing more.

A step: the tangent forward of query 1 sends its ``h`` up (the unperturbed activations: one message, as fo's);
the server runs one forward and one backward at ``h`` (its own gradient and dL/dh from that same forward) and
sends dL/dh down; the client forms ``c_1`` and then runs the tangent forwards of queries 2..Q, each reduced to
its ``c_q`` at once. The client never holds more than one activation and one tangent of the cut, and the
server's work does not grow with Q: Q client forwards (each about two plain ones) against ZO-SGD's 2Q client
and 2Q server forwards. Named for what it computes (a forward gradient: Baydin et al., 2022, "Gradients without
backpropagation"), not for torch's mechanism (a JVP).

Reads: ``q``, ``zo_lr``, ``zo_weight_decay``, ``zo_lr_schedule``, ``direction``, ``embedding_directions``,
``seed``. Not read: ``mu`` (no finite difference), ``server_grad`` (the server's gradient is from its forward at
the clean ``h``), ``batch_probes`` and ``pair_probes`` (no probes).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from hosl_lightning.core.zo import ZOSGD


class ForwardGradient(ZOSGD):
    """ZO-SGD whose coefficients are exact directional derivatives from dL/dh and forward-mode tangents."""

    name = "forward_gradient"
    estimator = "forward"
    extra_memory = "none (one weight's tangent while its module runs; one activation-sized tangent until dL/dh)"
    # No probes: no mu, and nothing for server_grad, batch_probes or pair_probes to choose (the server runs once).
    strategy_options: ClassVar[tuple[str, ...]] = ()

    def coefficients(self, losses: Tensor, mu: float) -> Tensor:
        raise TypeError("forward_gradient takes its coefficients from dL/dh and the client's tangents "
                        "(hosl_lightning.modes.forward_gradient), never from probe losses")
