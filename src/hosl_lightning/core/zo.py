"""Zeroth-order estimates and ZO-SGD, the client optimizer every other one builds on.

Directions are regenerated from seeds (:mod:`hosl_lightning.core.directions`: the optimizer holds its parameters'
:class:`~hosl_lightning.core.directions.ParameterDirections`) and probes never write the weights
(:mod:`hosl_lightning.core.perturbation`), so a client holds nothing but its weights between forwards.

Two estimators turn probe losses into projected gradients ``c_q``, so that the update is always
``-lr * (1/Q) sum_q c_q u_q`` (a few numbers per step, replayable from their seeds):

- ``two_point`` (the paper's SPSA): probes at ``+mu u_q`` and ``-mu u_q``; ``c_q = (L+ - L-) / (2 mu)``;
- ``one_sided`` (FZOO's): the unperturbed point and ``+mu u_q``; ``c_q = (L_q - L_0) / mu``, Q + 1 forwards.

A third, ``forward``, takes no probe losses at all: the client sends its unperturbed activations, the server
returns dL/dh, and ``c_q = <dL/dh, J u_q>`` exactly, from client forwards that carry the tangent ``u_q``
(:mod:`hosl_lightning.core.tangents`, :mod:`hosl_lightning.zo_optimizers.forward_gradient`).

A token embedding's direction is either dense (the paper's: every row of the table) or sparse: only the
rows the step's batch reads. The gradient is exactly zero on every other row, so the sparse estimate is
unbiased, drops the table's share of ``d_c`` from the variance, and its update costs the rows, not the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from hosl_lightning.core.directions import (
    DIRECTIONS,
    EMBEDDING_DIRECTIONS,
    DirectionSampler,
    ParameterDirections,
    mix_seed,
)
from hosl_lightning.core.options import check_choice, check_number
from hosl_lightning.core.perturbation import paired, perturbed

# re-exported: where callers have always found them
__all__ = ["DIRECTIONS", "EMBEDDING_DIRECTIONS", "DirectionSampler", "mix_seed"]
ESTIMATORS = ("two_point", "one_sided", "forward")
ZO_LR_SCHEDULES = ("constant", "linear", "cosine")
T = TypeVar("T")


@dataclass(frozen=True)
class ZOEstimate:
    """One step's zeroth-order gradient: ``(1/Q) sum_q coefficients[q] * u(step, q)``.

    ``rows`` holds, for each parameter key with a sparse direction, the sorted row ids its direction covers
    (the rows the step's batch read): the update touches those rows only, and a replay needs them.
    """

    step: int
    coefficients: Tensor  # [Q] projected gradients, e.g. c_q = (L+ - L-) / (2 mu)
    rows: dict[int, Tensor] = field(default_factory=dict)


def probe_points(estimator: str, queries: int) -> list[tuple[int, float]]:
    """The (query, sign) of each probe in the order they are sent: sign 0 is the unperturbed point."""
    check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "forward":  # the clean activations; the server's dL/dh gives every query's coefficient
        return [(0, 0.0)]
    if estimator == "one_sided":
        return [(0, 0.0), *((q, 1.0) for q in range(queries))]
    return [(q, sign) for q in range(queries) for sign in (1.0, -1.0)]


def estimate_coefficients(losses: Tensor, mu: float, estimator: str = "two_point") -> Tensor:
    """The Q projected gradients from the probe losses, in :func:`probe_points` order."""
    if estimator == "forward":
        raise ValueError("the 'forward' estimator takes its coefficients from dL/dh and the client's tangents "
                         "(hosl_lightning.core.tangents.projected_gradient), not from probe losses")
    if estimator == "one_sided":
        return (losses[1:] - losses[0]) / mu
    return projected_gradients(losses, mu)


def two_point_estimate(
    probe: Callable[[int, float], T], losses: Callable[[list[T]], Tensor], queries: int, mu: float
) -> tuple[Tensor, Tensor]:
    """The symmetric two-point (SPSA) estimate over ``queries`` directions.

    ``probe(q, sign)`` runs a forward at ``theta + sign * mu * u_q`` and returns what the loss needs
    (a loss, or activations to batch); ``losses`` turns all 2Q outputs, in the order (+1, -1, +2, -2, ...),
    into 2Q losses. Splitting the two lets the caller evaluate every loss in one batched server forward.
    Returns the Q projected gradients and the 2Q losses.
    """
    outputs = [probe(q, sign) for q, sign in probe_points("two_point", queries)]
    values = losses(outputs).detach().float().reshape(-1)
    if values.numel() != 2 * queries:
        raise ValueError(f"losses() returned {values.numel()} values for {2 * queries} probes")
    return projected_gradients(values, mu), values


def projected_gradients(losses: Tensor, mu: float) -> Tensor:
    """c_q = (L+_q - L-_q) / (2 mu) from 2Q losses in the order (+1, -1, +2, -2, ...)."""
    return (losses[0::2] - losses[1::2]) / (2 * mu)


def is_no_decay(name: str, param: Tensor) -> bool:
    """Biases and norm weights (1-D tensors) are exempt from weight decay, as in most LLM recipes."""
    return param.ndim < 2 or name.endswith(".bias")


class ZOSGD(Optimizer):
    """Zeroth-order SGD: ``theta -= lr * ((1/Q) sum_q c_q u_q + wd * theta)`` with regenerated directions.

    A real ``torch.optim.Optimizer`` so that LR schedulers, checkpoints and Lightning treat it like any
    other; it never reads ``.grad``. Its parameters' directions are ``parameter_directions`` (a
    ``hosl_lightning.core.directions.ParameterDirections``): each parameter's direction key is its position in the
    order given at construction (plus ``first_key``), and :meth:`perturbed`, :meth:`paired` and the update all draw
    through it, so probes and updates draw the same ``u_q``.

    Subclasses (``hosl_lightning.zo_optimizers``) change the estimator, the coefficients or the update; the
    class attributes say what a run must know about them.
    """

    name: ClassVar[str] = "zo_sgd"  # as registered (hosl_lightning.zo_optimizers)
    estimator: ClassVar[str] = "two_point"  # how probes become coefficients (see probe_points)
    replayable: ClassVar[bool] = True  # an update is fully described by (seed, step, lr, coefficients, rows)
    min_queries: ClassVar[int] = 1
    extra_memory: ClassVar[str] = "none"  # client memory beyond the weights, documented per optimizer
    options: ClassVar[dict[str, Any]] = {}  # its own options (beyond lr, weight decay, directions) and defaults
    # The strategy options it reads among those some zo_optimizer ignores; one it does not list is refused when set.
    # mu: the probes' radius; server_grad / batch_probes: where the server's gradient comes from among the probes
    # and how their losses run; pair_probes: a two-point estimate's +mu/-mu pair run as one forward.
    strategy_options: ClassVar[tuple[str, ...]] = ("mu", "server_grad", "batch_probes", "pair_probes")

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        direction: str = "gaussian",
        seed: int = 0,
        first_key: int = 0,
        embedding_directions: str = "dense",
        defaults: dict[str, Any] | None = None,
    ) -> None:
        named = list(named_params)
        if not named:
            raise ValueError(f"{type(self).__name__} got no parameters to train")
        check_number("lr", lr, 0)
        check_number("weight_decay", weight_decay, 0)
        check_choice("embedding_directions", embedding_directions, EMBEDDING_DIRECTIONS)
        for name, param in named:
            if not param.is_floating_point() or param.element_size() < 4:
                raise TypeError(
                    f"zeroth-order parameter {name!r} has dtype {param.dtype}: ZO updates of order lr*c*u vanish "
                    "or drift in reduced precision; keep the ZO side in torch.float32 (use precision '32-true' "
                    "or 'bf16-mixed', not '16-true'/'bf16-true')"
                )
        decay = [p for n, p in named if not is_no_decay(n, p)]
        no_decay = [p for n, p in named if is_no_decay(n, p)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay, **(defaults or {})})
        self.parameter_directions = ParameterDirections(named, DirectionSampler(direction, seed), first_key,
                                                        embedding_directions)
        self.predicted_decrease: float | None = None  # of the last step (first_order_decrease), for the diagnostic

    # ---- the parameters' directions (parameter_directions) -----------------------------------------------
    @property
    def sampler(self) -> DirectionSampler:
        """Draws each parameter's direction from (seed, step, query, key)."""
        return self.parameter_directions.sampler

    @property
    def keys(self) -> dict[int, int]:
        """``id(parameter)`` -> its direction key."""
        return self.parameter_directions.keys

    @property
    def names(self) -> dict[int, str]:
        """``id(parameter)`` -> its name."""
        return self.parameter_directions.names

    @property
    def embedding_directions(self) -> str:
        """``"dense"`` or ``"sparse"``: a token-embedding table's direction covers every row, or the rows read."""
        return self.parameter_directions.embedding_directions

    def row_directions(self, weight: Tensor, step: int, query: int, ids: Tensor) -> Tensor:
        """``u(step, query)[ids]`` for an embedding table (``parameter_directions.row_directions``)."""
        return self.parameter_directions.row_directions(weight, step, query, ids)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Check this optimizer's own options (named in ``options``) before anything is built."""

    def direction_signature(self) -> dict[str, Any]:
        """What besides the seeds fixes the directions drawn: a generator draws other numbers on another device
        type, chunks cut the draws, and a sparse table direction is drawn otherwise. Runs that replay or resume
        each other's directions must agree on it."""
        first = next(p for group in self.param_groups for p in group["params"])
        return {"direction_device": first.device.type, "direction_chunk": self.sampler.chunk,
                "embedding_directions": self.embedding_directions}

    # ---- the estimate ------------------------------------------------------------------------------------
    def coefficients(self, losses: Tensor, mu: float) -> Tensor:
        """This optimizer's coefficients from the probe losses (in ``probe_points`` order)."""
        return estimate_coefficients(losses, mu, self.estimator)

    def estimate(self, step: int, coefficients: Tensor) -> ZOEstimate:
        """The step's estimate, with the rows its sparse directions covered."""
        return ZOEstimate(step, coefficients, self.parameter_directions.support(step))

    # ---- the update --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, estimate: ZOEstimate | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if estimate is None:
            raise ValueError(f"{type(self).__name__}.step needs estimate=ZOEstimate(step, coefficients)")
        coefficients = estimate.coefficients.detach().float().cpu().tolist()
        self.predicted_decrease = self.first_order_decrease(coefficients)
        for group in self.param_groups:
            for param in group["params"]:
                self.update(param, group, estimate, coefficients)
        return loss

    def first_order_decrease(self, coefficients: list[float]) -> float | None:
        """The loss decrease this step's update predicts to first order, ``-<grad L, delta theta>``.

        With ``c_q`` the projected gradient ``<grad L, u_q>`` (exact for the forward estimator, to O(mu^2) for the
        two-point one), the update ``-lr (1/Q) sum_q c_q u_q`` lowers the loss by ``lr (1/Q) sum_q c_q^2``. None
        where that cannot be said from the coefficients alone: weight decay (its share needs ``grad L . theta``),
        or groups at different learning rates. Subclasses whose coefficients are no projected gradients, or whose
        update is not their estimate, return None.
        """
        rates = {group["lr"] for group in self.param_groups}
        if len(rates) != 1 or any(group["weight_decay"] for group in self.param_groups):
            return None
        return rates.pop() * sum(c * c for c in coefficients) / len(coefficients)

    def update(self, param: Tensor, group: dict[str, Any], estimate: ZOEstimate, coefficients: list[float]) -> None:
        """One tensor's share of ``step()`` (decoupled weight decay, then the ZO update); subclasses replace it."""
        if group["weight_decay"]:
            param.mul_(1.0 - group["lr"] * group["weight_decay"])
        self.add_directions(param, self.sampler, estimate.step, coefficients, group["lr"],
                            rows=estimate.rows.get(self.keys[id(param)]))

    def directions(self, param: Tensor, sampler: DirectionSampler, step: int, coefficients: list[float],
                   rows: Tensor | None = None) -> Iterator[tuple[Any, Tensor]]:
        """``(index, (1/Q) sum_q c_q u_q[index])`` over ``param``: chunks of rows, or a sparse direction's rows."""
        key, per_query = self.keys[id(param)], 1.0 / len(coefficients)
        if rows is not None:
            total = torch.zeros((rows.numel(), *param.shape[1:]), dtype=param.dtype, device=param.device)
            for query, coefficient in enumerate(coefficients):
                total.add_(sampler.sparse_rows(step, query, key, rows, param), alpha=per_query * coefficient)
            yield rows.to(param.device), total
            return
        per_query_chunks = [sampler.chunks(step, query, key, param) for query in range(len(coefficients))]
        for parts in zip(*per_query_chunks):  # the same chunk of every query's direction, one chunk at a time
            index, total = parts[0][0], parts[0][1].mul_(per_query * coefficients[0])
            for (_, u), coefficient in zip(parts[1:], coefficients[1:]):
                total.add_(u, alpha=per_query * coefficient)
            yield index, total

    @torch.no_grad()
    def add_directions(self, param: Tensor, sampler: DirectionSampler, step: int, coefficients: list[float], lr: float,
                       scale: float = 1.0, rows: Tensor | None = None) -> None:
        """``param -= scale * lr * (1/Q) sum_q c_q u_q``: the ZO update of one tensor, also used to replay an
        update that another client made (``sampler`` with its seed) from its (seed, step, coefficients, rows)."""
        key, per_query = self.keys[id(param)], 1.0 / len(coefficients)
        for query, coefficient in enumerate(coefficients):  # one query at a time: the paper's arithmetic, bit for bit
            alpha = -lr * per_query * coefficient * scale
            if rows is not None:
                param.index_add_(0, rows.to(param.device), sampler.sparse_rows(step, query, key, rows, param),
                                 alpha=alpha)
                continue
            for index, u in sampler.chunks(step, query, key, param):
                param[index].add_(u, alpha=alpha)

    # ---- probes ------------------------------------------------------------------------------------------
    def perturbed(self, modules: Sequence[nn.Module], step: int, query: int, scale: float,
                  half: bool = False) -> Any:
        """Run forwards of ``modules`` at ``theta + scale * u(step, query)`` without writing ``theta``.

        A plain ``nn.Embedding`` looks up the stored table and adds ``scale * u`` to the rows it returned
        (the same floats as a lookup in the perturbed table); any other module reads a perturbed copy of
        its weights for the duration of its own forward call.

        Raises if a ZO parameter was never reached by a module's own forward call (a parameter read
        directly by another module would silently escape the perturbation). With ``half``, only the parameters
        of ``modules`` must be reached: one half's probe of an optimizer over both (zo's halves, in one process).
        """
        return perturbed(self.parameter_directions, modules, step, query, scale, half)

    def paired(self, modules: Sequence[nn.Module], step: int, query: int, mu: float, rows: int,
               half: bool = False) -> Any:
        """The ``+mu`` and ``-mu`` probes of ``query`` as one forward of a doubled batch of ``rows`` rows (first
        half ``+mu``), each direction drawn once for both (``hosl_lightning.core.perturbation.paired``)."""
        return paired(self.parameter_directions, modules, step, query, mu, rows, half)


def zo_lr_scheduler(optimizer: ZOSGD, schedule: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``zo_lr`` over ``total_steps`` steps: constant, or decayed to 0 linearly or by a half cosine. A torch
    scheduler, so it is stepped once per step and checkpointed like any other."""
    check_choice("zo_lr_schedule", schedule, ZO_LR_SCHEDULES)
    if schedule != "constant" and not math.isfinite(total_steps):
        raise ValueError(f"zo_lr_schedule={schedule!r} is not valid for a fit without an end: set max_steps or "
                         "max_epochs, or use zo_lr_schedule='constant'")
    horizon = max(int(total_steps), 1) if math.isfinite(total_steps) else 1

    def factor(step: int) -> float:
        progress = min(step / horizon, 1.0)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
