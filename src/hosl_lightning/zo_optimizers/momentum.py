"""ZO-SGD with momentum (ZO-SGD-MMT in Zhang et al., 2024, "Revisiting zeroth-order optimization for
memory-efficient LLM fine-tuning: a benchmark"): ``m = beta m + g_hat``, ``theta -= lr m``.

Momentum averages the noisy one-direction estimates over about 1 / (1 - beta) steps, so the update follows
their common part. Extra client memory: one buffer the size of the client's ZO weights (d_c floats), dense
even where the directions are sparse, so the update walks every row. Seed sync: refused; the buffer is state
that an update's numbers do not carry (use ``client_sync: weights``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from hosl_lightning.core.options import check_number
from hosl_lightning.core.zo import ZOSGD, ZOEstimate


class ZOMomentum(ZOSGD):
    """ZO-SGD with a heavy-ball momentum buffer per parameter (checkpointed with the optimizer's state)."""

    name = "zo_momentum"
    replayable = False
    extra_memory = "one buffer per client ZO weight (d_c floats)"
    options: ClassVar[dict[str, Any]] = {"momentum": 0.9}

    @classmethod
    def check_options(cls, momentum: float = 0.9) -> None:
        check_number("momentum", momentum, 0, 0.999)

    def __init__(self, *args: Any, momentum: float = 0.9, **kwargs: Any) -> None:
        self.check_options(momentum)
        super().__init__(*args, defaults={"momentum": float(momentum)}, **kwargs)

    def first_order_decrease(self, coefficients: list[float]) -> float | None:
        """None: the update follows the buffer, whose product with the gradient this step's numbers do not give."""
        return None

    def update(self, param: Tensor, group: dict[str, Any], estimate: ZOEstimate, coefficients: list[float]) -> None:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer: Tensor = state["momentum_buffer"]
        buffer.mul_(group["momentum"])
        rows = estimate.rows.get(self.keys[id(param)])
        for index, total in self.directions(param, self.sampler, estimate.step, coefficients, rows):
            if isinstance(index, Tensor):
                buffer.index_add_(0, index, total)
            else:
                buffer[index].add_(total)
        if group["weight_decay"]:
            param.mul_(1.0 - group["lr"] * group["weight_decay"])
        param.add_(buffer, alpha=-group["lr"])
