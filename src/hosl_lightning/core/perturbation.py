"""Forwards at ``theta + scale * u`` that never write ``theta``: one probe at a time, or both signs at once.

While a probe forward runs, each module that owns ZO parameters reads ``w + scale * u`` just for the duration
of its own forward call (one tensor-sized temporary at a time, placed by :mod:`hosl_lightning.core.module_hooks`),
and the stored weights are never written. Restoring is therefore exact by construction, in any dtype, where an
in-place ``+mu, -2mu, +mu`` round trip in fp32 drifts by one ulp on about half of the elements every probe.

A plain token embedding never builds its perturbed table: it adds ``scale * u[ids]`` to the rows the batch
looked up, drawing only those rows (all of a sparse direction's rows are the batch's own).

:func:`paired` runs the ``+mu`` and ``-mu`` probes of one query as one forward of a doubled batch: the first
half of every call sees ``w + mu u``, the second ``w - mu u``, and each tensor's ``u`` is drawn once for both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hosl_lightning.core.directions import ParameterDirections
from hosl_lightning.core.module_hooks import check_reached, is_plain_embedding, owners, substituted_parameters


def _shifted(directions: ParameterDirections, param: nn.Parameter, step: int, query: int,
             scales: Sequence[float]) -> list[Tensor]:
    """``param + s * u`` for each ``s``, drawing ``u`` once, chunk by chunk."""
    outs = [torch.empty_like(param) for _ in scales]
    weights = param.detach()
    for rows, u in directions.sampler.chunks(step, query, directions.keys[id(param)], param):
        for out, scale in zip(outs, scales):
            torch.mul(u, scale, out=out[rows]).add_(weights[rows])  # scale * u, then + w: as a lookup rounds
    return outs


@contextmanager
def perturbed(directions: ParameterDirections, modules: Sequence[nn.Module], step: int, query: int, scale: float,
              half: bool = False) -> Iterator[None]:
    """Run forwards of ``modules`` at ``theta + scale * u(step, query)``, ``u`` drawn by ``directions`` (an
    optimizer's: see :meth:`hosl_lightning.core.zo.ZOSGD.perturbed`)."""

    def shifted(param: nn.Parameter) -> Tensor:
        return _shifted(directions, param, step, query, (scale,))[0]

    def perturb_rows(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return directions.row_directions(module.weight, step, query, args[0]).mul_(scale).add_(output)

    with substituted_parameters(directions, modules, shifted, perturb_rows, half):
        yield


def _halves(value: Any, rows: int, index: int) -> Any:
    """``value``'s ``index``-th half along the batch axis when it is a tensor of ``rows`` rows, or of ``k * rows``
    (a batch flattened with its tokens, as OPT's MLP sees it: batch-major, so the first half is the + probe),
    else ``value`` whole (positions shared by every row, a mask without a batch axis)."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] >= rows and value.shape[0] % rows == 0:
        half = value.shape[0] // 2
        return value[:half] if index == 0 else value[half:]
    return value


def _joined(first: Any, second: Any, module: nn.Module) -> Any:
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_joined(a, b, module) for a, b in zip(first, second))
    raise TypeError(f"paired probes cannot join the outputs of {type(module).__name__} ({type(first).__name__}): "
                    "set pair_probes=False to run the two probes of a query one after the other")


@contextmanager
def paired(directions: ParameterDirections, modules: Sequence[nn.Module], step: int, query: int, mu: float, rows: int,
           half: bool = False) -> Iterator[None]:
    """Run a forward of ``rows`` = 2B rows whose first B rows see ``theta + mu u`` and last B ``theta - mu u``.

    Each module that owns ZO parameters is called once per half, on that half of every input of ``rows``
    rows, with its parameters drawn once for both signs; a module called inside such a call (a child of a
    module that owns parameters itself) keeps the half's sign. A plain embedding perturbs the rows it returned.
    """
    if rows % 2:
        raise ValueError(f"a paired probe needs an even number of rows (2B), got {rows}")
    reached: set[int] = set()
    sign_of_half: list[float | None] = [None]  # set while a module runs one half: what its children see
    forwards: dict[int, tuple[nn.Module, Any]] = {}

    def split_forward(module: nn.Module, original: Any) -> Any:
        names = [n for n, p in module._parameters.items() if p is not None and id(p) in directions.keys]

        def run(args: tuple[Any, ...], kwargs: dict[str, Any], shifted: dict[str, Tensor], sign: float) -> Any:
            params = {n: module._parameters[n] for n in names}
            enclosing, sign_of_half[0] = sign_of_half[0], sign
            module._parameters.update(shifted)
            try:
                return original(*args, **kwargs)
            finally:
                module._parameters.update(params)
                sign_of_half[0] = enclosing

        def forward(*args: Any, **kwargs: Any) -> Any:
            reached.update(id(module._parameters[n]) for n in names)
            enclosing = sign_of_half[0]
            if enclosing is not None:  # inside one half of an enclosing module: that half's sign only
                shifted = {n: _shifted(directions, module._parameters[n], step, query, (enclosing * mu,))[0]
                           for n in names}
                return run(args, kwargs, shifted, enclosing)
            pairs = {n: _shifted(directions, module._parameters[n], step, query, (mu, -mu)) for n in names}
            outputs = []
            for index, sign in enumerate((1.0, -1.0)):
                part_args = tuple(_halves(a, rows, index) for a in args)
                part_kwargs = {k: _halves(v, rows, index) for k, v in kwargs.items()}
                outputs.append(run(part_args, part_kwargs, {n: pair[index] for n, pair in pairs.items()}, sign))
                for pair in pairs.values():
                    pair[index] = None  # type: ignore[call-overload]  # free the + copy before the - half runs
            return _joined(outputs[0], outputs[1], module)

        return forward

    def perturb_rows(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        reached.add(id(module.weight))
        offset = directions.row_directions(module.weight, step, query, args[0])
        enclosing = sign_of_half[0]
        if enclosing is not None:
            return offset.mul_(enclosing * mu).add_(output)
        if output.shape[0] == 1 and rows > 1:  # positions shared by the batch ([1, T]): each half gets its own sign
            offset = offset.expand(rows, *offset.shape[1:]).clone()
        elif output.shape[0] != rows:
            raise ValueError(f"a paired probe's embedding lookup has {output.shape[0]} rows, expected {rows} or 1: "
                             "set pair_probes=False to run the two probes of a query one after the other")
        offset[: rows // 2].mul_(mu)
        offset[rows // 2:].mul_(-mu)
        return offset.add_(output)

    handles = []
    for module in owners(directions, modules):
        if is_plain_embedding(module) and id(module.weight) in directions.keys:
            handles.append(module.register_forward_hook(perturb_rows))
        else:
            forwards[id(module)] = (module, module.__dict__.get("forward"))
            module.forward = split_forward(module, module.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, own in forwards.values():
            if own is None:
                del module.forward
            else:
                module.forward = own  # type: ignore[method-assign]
    check_reached(directions, modules, reached, half)
