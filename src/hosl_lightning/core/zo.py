"""Zeroth-order machinery: seeded directions, perturbed forwards, the two-point estimate and ZO-SGD.

A direction is never stored: each tensor's slice of direction ``u_q`` is regenerated from a seed derived
from (base seed, step, query, parameter index), so a resumed run draws exactly the directions an
uninterrupted one would, and a client update is fully described by a list of (seed, scalar) pairs.

Perturbation happens *on the fly*: while a probe forward runs, each module that owns ZO parameters has
them swapped for ``w + scale * u`` just for the duration of its own forward call (one tensor-sized
temporary at a time), and the stored weights are never written. Restoring is therefore exact by
construction, in any dtype, where an in-place ``+mu, -2mu, +mu`` round trip in fp32 drifts by one ulp
on about half of the elements every probe.

Directions are drawn in chunks of rows, each from its own seed, so that nothing ever needs a whole
table's direction at once: a token embedding adds ``scale * u`` to the rows a batch looks up (its
output), never building the perturbed table, and the update walks each tensor chunk by chunk. On a
135M-parameter model that is the difference between a client peak at the inference floor and one
embedding table (~100 MiB) above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from hosl_lightning.core.options import check_choice, check_int, check_number

DIRECTIONS = ("gaussian", "rademacher")
ZO_LR_SCHEDULES = ("constant", "linear", "cosine")
_MASK64 = (1 << 64) - 1
T = TypeVar("T")


def mix_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 rounds), stable across runs and platforms."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


DIRECTION_CHUNK = 1 << 14  # elements per generator call (64 KiB in fp32): ~5% call overhead, few wasted rows


class DirectionSampler:
    """Regenerates the random direction of one parameter tensor for one (step, query) from its seed.

    A tensor's direction is cut into chunks of whole rows (dim 0), at most ``chunk`` elements each, and
    chunk ``i`` is drawn from seed ``mix_seed(seed, step, query, key, i)``: any chunk, and so any rows, can
    be regenerated alone, and the whole direction is the same however it is assembled.
    """

    def __init__(self, kind: str = "gaussian", seed: int = 0, chunk: int = DIRECTION_CHUNK) -> None:
        check_choice("direction", kind, DIRECTIONS)
        check_int("chunk", chunk, 1)
        self.kind = kind
        self.seed = int(seed)
        self.chunk = int(chunk)

    def seed_for(self, step: int, query: int, key: int, chunk: int = 0) -> int:
        return mix_seed(self.seed, step, query, key, chunk)

    def rows_per_chunk(self, like: Tensor) -> int:
        row = like[0].numel() if like.ndim > 1 else 1
        return max(1, self.chunk // max(row, 1))

    def chunks(self, step: int, query: int, key: int, like: Tensor) -> Iterator[tuple[Any, Tensor]]:
        """``(rows, u[rows])`` for each chunk of ``like``'s direction, in order: one chunk alive at a time."""
        if like.ndim == 0:
            yield ..., self._draw(step, query, key, 0, like.shape, like)
            return
        per_chunk = self.rows_per_chunk(like)
        for index, start in enumerate(range(0, like.shape[0], per_chunk)):
            rows = slice(start, min(start + per_chunk, like.shape[0]))
            yield rows, self._draw(step, query, key, index, (rows.stop - start, *like.shape[1:]), like)

    def direction(self, step: int, query: int, key: int, like: Tensor) -> Tensor:
        """A fresh tensor shaped like ``like``: N(0, 1) entries, or +-1 for rademacher."""
        if like.ndim == 0:
            return self._draw(step, query, key, 0, like.shape, like)
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        for rows, part in self.chunks(step, query, key, like):
            out[rows] = part
        return out

    def rows(self, step: int, query: int, key: int, like: Tensor, index: Tensor) -> Tensor:
        """``direction(...)[index]`` for integer ``index`` (any shape), drawing only the chunks it touches."""
        per_chunk = self.rows_per_chunk(like)
        flat = index.reshape(-1)
        out = torch.empty((flat.numel(), *like.shape[1:]), dtype=like.dtype, device=like.device)
        order = torch.argsort(flat)
        chunk_of = torch.div(flat[order], per_chunk, rounding_mode="floor")
        chunks, counts = torch.unique_consecutive(chunk_of, return_counts=True)
        start_of_run = 0
        for chunk, count in zip(chunks.tolist(), counts.tolist()):
            where = order[start_of_run:start_of_run + count]
            start_of_run += count
            first = chunk * per_chunk
            size = min(per_chunk, like.shape[0] - first)
            part = self._draw(step, query, key, chunk, (size, *like.shape[1:]), like)
            out[where] = part[flat[where] - first]
        return out.reshape(*index.shape, *like.shape[1:])

    def _draw(self, step: int, query: int, key: int, chunk: int, shape: tuple[int, ...] | torch.Size,
              like: Tensor) -> Tensor:
        generator = torch.Generator(device=like.device)
        generator.manual_seed(self.seed_for(step, query, key, chunk))
        if self.kind == "gaussian":
            return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
        signs = torch.randint(0, 2, shape, generator=generator, device=like.device, dtype=torch.int8)
        return signs.to(like.dtype).mul_(2).sub_(1)


@dataclass(frozen=True)
class ZOEstimate:
    """One step's zeroth-order gradient: ``(1/Q) sum_q coefficients[q] * u(step, q)``."""

    step: int
    coefficients: Tensor  # [Q] projected gradients c_q = (L+ - L-) / (2 mu)


def two_point_estimate(
    probe: Callable[[int, float], T], losses: Callable[[list[T]], Tensor], queries: int, mu: float
) -> tuple[Tensor, Tensor]:
    """The symmetric two-point (SPSA) estimate over ``queries`` directions.

    ``probe(q, sign)`` runs a forward at ``theta + sign * mu * u_q`` and returns what the loss needs
    (a loss, or activations to batch); ``losses`` turns all 2Q outputs, in the order (+1, -1, +2, -2, ...),
    into 2Q losses. Splitting the two lets the caller evaluate every loss in one batched server forward.
    Returns the Q projected gradients and the 2Q losses.
    """
    outputs = [probe(q, sign) for q in range(queries) for sign in (1.0, -1.0)]
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
    other; it never reads ``.grad``. Each parameter's direction key is its position in the order given
    at construction (plus ``first_key``), shared with :meth:`perturbed` so probes and updates draw the same ``u_q``.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        direction: str = "gaussian",
        seed: int = 0,
        first_key: int = 0,
    ) -> None:
        named = list(named_params)
        if not named:
            raise ValueError("ZOSGD got no parameters to train")
        check_number("lr", lr, 0)
        check_number("weight_decay", weight_decay, 0)
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
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay})
        self.sampler = DirectionSampler(direction, seed)
        self.names = {id(p): n for n, p in named}
        # first_key: a server process's share of an all-ZO split continues the client's keys, so both draw
        # exactly the directions that one optimizer over both halves would.
        self.keys = {id(p): first_key + index for index, (_, p) in enumerate(named)}

    def direction_signature(self) -> dict[str, Any]:
        """What besides the seeds fixes the directions drawn: a generator draws other numbers on another device
        type, and chunks cut the draws. Runs that replay or resume each other's directions must agree on it."""
        first = next(p for group in self.param_groups for p in group["params"])
        return {"direction_device": first.device.type, "direction_chunk": self.sampler.chunk}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, estimate: ZOEstimate | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if estimate is None:
            raise ValueError("ZOSGD.step needs estimate=ZOEstimate(step, coefficients)")
        coefficients = estimate.coefficients.detach().float().cpu().tolist()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for param in group["params"]:
                if weight_decay:
                    param.mul_(1.0 - lr * weight_decay)
                self.add_directions(param, self.sampler, estimate.step, coefficients, lr)
        return loss

    @torch.no_grad()
    def add_directions(self, param: Tensor, sampler: DirectionSampler, step: int, coefficients: list[float], lr: float,
                       scale: float = 1.0) -> None:
        """``param -= scale * lr * (1/Q) sum_q c_q u_q``: the ZO update of one tensor, also used to replay an
        update that another client made (``sampler`` with its seed) from its (seed, step, coefficients)."""
        key = self.keys[id(param)]
        per_query = 1.0 / len(coefficients)
        for query, coefficient in enumerate(coefficients):
            for rows, u in sampler.chunks(step, query, key, param):
                param[rows].add_(u, alpha=-lr * per_query * coefficient * scale)

    @contextmanager
    def perturbed(self, modules: Sequence[nn.Module], step: int, query: int, scale: float,
                  half: bool = False) -> Iterator[None]:
        """Run forwards of ``modules`` at ``theta + scale * u(step, query)`` without writing ``theta``.

        A plain ``nn.Embedding`` looks up the stored table and adds ``scale * u`` to the rows it returned
        (the same floats as a lookup in the perturbed table); any other module reads a perturbed copy of
        its weights for the duration of its own forward call.

        Raises if a ZO parameter was never reached by a module's own forward call (a parameter read
        directly by another module would silently escape the perturbation). With ``half``, only the parameters
        of ``modules`` must be reached: one half's probe of an optimizer over both (zo's halves, in one process).
        """
        swapped: dict[tuple[int, str], tuple[nn.Module, str, nn.Parameter]] = {}
        temps: dict[int, Tensor] = {}  # one perturbed copy per parameter, shared by every module reading it
        reached: set[int] = set()

        def swap_in(module: nn.Module, _args: Any) -> None:
            for name, param in list(module._parameters.items()):
                if param is None or id(param) not in self.keys or (id(module), name) in swapped:
                    continue
                if id(param) not in temps:
                    temp = torch.empty_like(param)
                    for rows, u in self.sampler.chunks(step, query, self.keys[id(param)], param):
                        temp[rows] = u.mul_(scale).add_(param.detach()[rows])
                    temps[id(param)] = temp
                module._parameters[name] = temps[id(param)]
                swapped[(id(module), name)] = (module, name, param)
                reached.add(id(param))

        def swap_out(module: nn.Module, _args: Any, _output: Any) -> None:
            for key, (owner, name, param) in list(swapped.items()):
                if owner is module:
                    owner._parameters[name] = param
                    del swapped[key]
                    if not any(p is param for _, _, p in swapped.values()):
                        temps.pop(id(param), None)

        def perturb_rows(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            weight = module.weight
            reached.add(id(weight))
            offset = self.sampler.rows(step, query, self.keys[id(weight)], weight, args[0])
            return offset.mul_(scale).add_(output)

        handles = []
        for root in modules:
            for module in root.modules():
                if not any(p is not None and id(p) in self.keys for p in module._parameters.values()):
                    continue
                if _is_plain_embedding(module) and id(module.weight) in self.keys:
                    handles.append(module.register_forward_hook(perturb_rows))
                else:
                    handles.append(module.register_forward_pre_hook(swap_in))
                    handles.append(module.register_forward_hook(swap_out))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for owner, name, param in swapped.values():
                owner._parameters[name] = param
            temps.clear()
        in_scope = {id(p) for root in modules for p in root.parameters()} if half else self.keys
        missing = [self.names[key] for key in self.keys if key in in_scope and key not in reached]
        if missing:
            raise RuntimeError(
                f"{len(missing)} zeroth-order parameter(s) were not used by any module's forward during a probe, "
                f"so perturbing them is impossible: {missing[:5]}. Parameters must be read by the module that "
                "owns them (a module reading another module's .weight directly escapes the perturbation)."
            )


def _is_plain_embedding(module: nn.Module) -> bool:
    """An embedding whose output is exactly ``weight[ids]``, so perturbing rows equals perturbing the table.

    Subclasses that scale or offset inside ``forward`` (OPT's learned positions, Gemma's scaled embedding)
    and ``max_norm`` (which renormalises the looked-up rows) take the general path instead.
    """
    return type(module).forward is nn.Embedding.forward and isinstance(module, nn.Embedding) and module.max_norm is None


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
