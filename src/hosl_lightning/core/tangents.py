"""Client forwards that carry a tangent: the activations ``h`` and the directional derivative ``J u_q`` in one pass.

Forward-mode AD (``torch.autograd.forward_ad``) gives, for the seeded direction ``u_q`` of the client's weights,
``d h / d theta . u_q`` alongside ``h``. With the server's ``dL/dh``, ``<dL/dh, J u_q> = <grad L, u_q>`` exactly:
the projected gradient that the two-point estimate approximates with ``(L+ - L-) / 2 mu``.

The tangent is placed the way :mod:`hosl_lightning.core.perturbation` places a perturbation, module by module
(both through :mod:`hosl_lightning.core.module_hooks`): while a module that owns ZO weights runs its own forward,
it reads dual tensors ``(w, u)`` (one tensor-sized direction at a time, drawn by the optimizer's
:class:`~hosl_lightning.core.directions.ParameterDirections` from the same seeds as the probes), and its stored
weights are never touched. A plain token embedding keeps its table and gives its output the tangent ``u[ids]``: only
the rows looked up are drawn, dense or sparse, by
:meth:`~hosl_lightning.core.directions.ParameterDirections.row_directions`, the probes' own function. No full-size
tangent of the client ever exists, and nothing is kept for a backward.

Attention: torch's fused CPU/CUDA attention kernels have no forward-mode formula, so these forwards run
``scaled_dot_product_attention`` with its math backend (:func:`math_attention`), which does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hosl_lightning.core.directions import ParameterDirections
from hosl_lightning.core.module_hooks import substituted_parameters
from hosl_lightning.core.split import CutActivations


def math_attention() -> Any:
    """``scaled_dot_product_attention`` through its math backend: the fused kernels have no forward-mode AD."""
    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def tangents(directions: ParameterDirections, modules: Sequence[nn.Module], step: int, query: int) -> Iterator[None]:
    """Inside a ``forward_ad.dual_level``: forwards of ``modules`` carry the tangent ``u(step, query)``."""

    def dual(param: nn.Parameter) -> Tensor:
        direction = directions.sampler.direction(step, query, directions.keys[id(param)], param)
        return fwAD.make_dual(param.detach(), direction)

    def tangent_rows(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        primal = fwAD.unpack_dual(output).primal
        return fwAD.make_dual(primal, directions.row_directions(module.weight, step, query, args[0]))

    with substituted_parameters(directions, modules, dual, tangent_rows):
        yield


def forward_with_tangent(directions: ParameterDirections, client: nn.Module, step: int, query: int,
                         forward: Any) -> tuple[CutActivations, Tensor]:
    """``forward()`` (a client forward returning :class:`CutActivations`) with the tangent ``u(step, query)`` on
    ``client``'s ZO weights: the activations and their directional derivative ``J u``, both plain tensors."""
    with torch.no_grad(), math_attention(), fwAD.dual_level(), tangents(directions, [client], step, query):
        up = forward()
        primal, tangent = fwAD.unpack_dual(up.hidden)
        primal = primal.clone()  # no view of a dual tensor outlives the level
        tangent = torch.zeros_like(primal) if tangent is None else tangent.clone()
    return replace(up, hidden=primal), tangent


def projected_gradient(gradient: Tensor, tangent: Tensor) -> Tensor:
    """``<dL/dh, J u>`` (= ``<grad L, u>``), summed in float64: a float32 sum over a whole batch of activations
    loses digits that a comparison with a finite difference would notice."""
    return (gradient.detach().double() * tangent.double()).sum().float().reshape(1)
