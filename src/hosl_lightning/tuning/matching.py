"""GradMatch: choose a few mini-batches, with non-negative weights, whose weighted gradient matches the full one.

Orthogonal matching pursuit (Killamsetty et al., ICML 2021; per-batch, as AUTOMATA uses it): add the candidate
whose feature best agrees with what is still unmatched, refit all weights (non-negative least squares with a
ridge), repeat. Every iteration scores all candidates with one matrix-vector product; the only Python loop
is over the ``budget`` picks, never over examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """Chosen candidates (row indices of the feature matrix) and their weights, mean 1 over the chosen."""

    indices: list[int]
    weights: list[float]
    matched: int  # how many of the indices OMP chose; the rest filled the budget at random (weight 1)
    residual: float  # ||target - sum w_i f_i|| / ||target|| after matching (0 when nothing was matched)


def nnls(gram: Tensor, rhs: Tensor, iterations: int = 500, tolerance: float = 1e-7) -> Tensor:
    """argmin_{w >= 0} 1/2 w^T G w - rhs^T w for a positive semi-definite G, by accelerated projected gradient.

    Written here rather than taken from scipy: the problems are tiny (budget x budget), stay on the tensors'
    device, and the package keeps no scipy dependency.
    """
    step = 1.0 / max(float(torch.linalg.eigvalsh(gram).max()), 1e-12)
    w = torch.zeros_like(rhs)
    momentum, t = w.clone(), 1.0
    for _ in range(iterations):
        updated = (momentum - step * (gram @ momentum - rhs)).clamp_min(0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        momentum = updated + ((t - 1.0) / t_next) * (updated - w)
        change = (updated - w).norm()
        w, t = updated, t_next
        if change <= tolerance * max(float(w.norm()), 1e-12):
            break
    return w


def orthogonal_matching_pursuit(
    features: Tensor, target: Tensor, budget: int, ridge: float = 1e-3, tolerance: float = 1e-4
) -> tuple[list[int], Tensor, float]:
    """Up to ``budget`` rows of ``features`` and non-negative weights with sum_i w_i f_i ~ ``target``.

    ``ridge`` is relative to the mean squared feature norm, so it means the same at any gradient scale. Stops
    early when no candidate correlates positively with the residual, or the residual is below ``tolerance``
    of the target's norm. Returns the chosen rows, their weights and the relative residual.
    """
    n = features.shape[0]
    if not 1 <= budget <= n:
        raise ValueError(f"budget={budget} is not valid: it must be between 1 and the number of candidates ({n})")
    features, target = features.double(), target.double()
    scale = max(float(features.square().sum(dim=1).mean()), 1e-30)
    target_norm = max(float(target.norm()), 1e-30)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    chosen: list[int] = []
    weights = torch.zeros(0, dtype=features.dtype, device=features.device)
    residual = target.clone()
    while len(chosen) < budget:
        correlation = (features @ residual).masked_fill(~available, -torch.inf)
        best = int(correlation.argmax())
        if not correlation[best] > 0:
            break
        chosen.append(best)
        available[best] = False
        picked = features[chosen]
        gram = picked @ picked.T + ridge * scale * torch.eye(len(chosen), dtype=features.dtype, device=features.device)
        weights = nnls(gram, picked @ target)
        residual = target - weights @ picked
        if float(residual.norm()) <= tolerance * target_norm:
            break
    return chosen, weights.float(), float(residual.norm()) / target_norm


def gradmatch(features: Tensor, budget: int, generator: torch.Generator, ridge: float = 1e-3) -> Selection:
    """Match the mean of all candidates' features with ``budget`` weighted candidates.

    Candidates OMP gives zero weight are dropped; the budget is filled with random others at weight 1 (as
    CORDS does), so every subset epoch has the same number of steps. Weights are rescaled to mean 1 over the
    matched candidates, which keeps the optimiser's learning rate meaning what it meant on full data.
    """
    target = features.mean(dim=0)
    chosen, weights, residual = orthogonal_matching_pursuit(features, target, budget, ridge)
    kept = [(i, float(w)) for i, w in zip(chosen, weights.tolist()) if w > 0]
    mean = sum(w for _, w in kept) / len(kept) if kept else 1.0
    indices, values = [i for i, _ in kept], [w / mean for _, w in kept]
    if len(indices) < budget:
        taken = torch.zeros(features.shape[0], dtype=torch.bool)
        taken[indices] = True
        others = (~taken).nonzero().flatten()
        extra = others[torch.randperm(len(others), generator=generator)[: budget - len(indices)]].tolist()
        indices, values = indices + extra, values + [1.0] * len(extra)
    return Selection(indices, values, matched=len(kept), residual=residual)


def random_subset(candidates: int, budget: int, generator: torch.Generator) -> Selection:
    """``budget`` candidates drawn uniformly without replacement, weight 1: the baseline GradMatch must beat."""
    indices = torch.randperm(candidates, generator=generator)[:budget].tolist()
    return Selection(indices, [1.0] * len(indices), matched=0, residual=0.0)
