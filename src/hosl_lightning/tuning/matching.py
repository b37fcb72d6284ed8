"""GradMatch: choose a few mini-batches, with non-negative weights, whose weighted gradient matches the full one.

Orthogonal matching pursuit (Killamsetty et al., ICML 2021; per-batch, as AUTOMATA uses it): add the candidate
whose feature best agrees with what is still unmatched, refit all weights (non-negative least squares with a
ridge), repeat. Every iteration scores all candidates with one matrix-vector product; the only Python loop
is over the ``budget`` picks, never over examples. Per class over examples (CORDS' PerClass and
PerClassPerGradient), and two baselines: random picks, and a model-agnostic coverage subset (MILO-style facility
location over fixed embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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


def class_budgets(labels: Tensor, budget: int) -> dict[int, int]:
    """``budget`` split over the classes in proportion to their sizes (largest remainder), each at most its size."""
    classes, sizes = labels.unique(return_counts=True)
    if not 1 <= budget <= len(labels):
        raise ValueError(f"budget={budget} is not valid: it must be between 1 and the number of examples ({len(labels)})")
    exact = sizes.double() * budget / len(labels)
    shares = exact.floor().long()
    for index in (exact - shares).argsort(descending=True)[: budget - int(shares.sum())]:
        shares[index] += 1
    return {int(c): int(min(s, n)) for c, s, n in zip(classes, shares, sizes)}


def _class_shares(labels: Tensor, budget: int) -> Iterator[tuple[int, Tensor, int]]:
    """Each class's label, its examples' indices and its share of ``budget`` (``class_budgets``), zero shares too."""
    for label, share in class_budgets(labels, budget).items():
        yield label, (labels == label).nonzero().flatten(), share


def per_class_gradmatch(
    features: Tensor, labels: Tensor, budget: int, generator: torch.Generator, ridge: float = 1e-3,
    num_classes: int | None = None,
) -> Selection:
    """GradMatch class by class over examples (CORDS' PerClass; PerClassPerGradient with ``num_classes``).

    Each class gets a share of ``budget`` in proportion to its size, and matching pursuit matches the mean
    feature of that class's examples with its share. With ``num_classes`` the features are that many blocks
    (one per class, as ``label_head_row_features`` gives) and class c is matched on block c alone: the gradient
    at its own label-word row. Weights are mean 1 within each class, so the subset keeps the data's class mix.
    """
    if len(labels) != features.shape[0]:
        raise ValueError(f"{len(labels)} labels for {features.shape[0]} examples")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes={num_classes} is not valid: it must be an integer >= 1, or None")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0; the smallest is {int(labels.min())}")
    if num_classes is not None and features.shape[1] % num_classes:
        raise ValueError(f"num_classes={num_classes} does not divide the {features.shape[1]} feature columns into "
                         "one block per class")
    if num_classes is not None and int(labels.max()) >= num_classes:
        raise ValueError(f"num_classes={num_classes} has no block for label {int(labels.max())}")
    indices: list[int] = []
    weights: list[float] = []
    matched, residuals = 0, []
    for label, members, share in _class_shares(labels, budget):
        if share == 0:
            continue
        block = features[members]
        if num_classes is not None:  # its own label-word row's block alone
            block = block.view(len(members), num_classes, -1)[:, label]
        chosen = gradmatch(block, share, generator, ridge)
        indices += members[chosen.indices].tolist()
        weights += chosen.weights
        matched += chosen.matched
        residuals.append(chosen.residual)
    return Selection(indices, weights, matched=matched, residual=max(residuals, default=0.0))


def facility_location(
    embeddings: Tensor, labels: Tensor, budget: int, generator: torch.Generator, epsilon: float = 0.01
) -> Selection:
    """A model-agnostic subset (MILO-style): per class, examples that best cover the class under cosine similarity.

    Greedy facility location, max sum_i max_{j in S} sim(i, j), class by class with shares proportional to the
    class sizes; stochastic greedy (each pick scores a random (n / k) log(1 / epsilon) of the candidates), so
    each ``generator`` gives another near-optimal subset: MILO's stochastic-greedy exploration. Weight 1.
    Written here: apricot-select, the library for it, was last released in 2021 and pulls in numba.
    """
    if len(labels) != embeddings.shape[0]:
        raise ValueError(f"{len(labels)} labels for {embeddings.shape[0]} examples")
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    indices: list[int] = []
    for _, members, share in _class_shares(labels, budget):
        if share == 0:
            continue
        similarity = (unit[members] @ unit[members].T).clamp_min(0.0)  # non-negative: the objective is monotone
        n = len(members)
        sample = max(1, min(n, math.ceil(n / share * math.log(1 / epsilon))))
        covered = torch.zeros(n, dtype=similarity.dtype)
        available = torch.ones(n, dtype=torch.bool)
        for _ in range(share):
            pool = available.nonzero().flatten()
            pool = pool[torch.randperm(len(pool), generator=generator)[:sample]]
            gains = (similarity[:, pool] - covered[:, None]).clamp_min(0.0).sum(dim=0)
            best = int(pool[gains.argmax()])
            covered = torch.maximum(covered, similarity[:, best])
            available[best] = False
            indices.append(int(members[best]))
    return Selection(indices, [1.0] * len(indices), matched=0, residual=0.0)


def random_examples(labels: Tensor, budget: int, generator: torch.Generator) -> Selection:
    """``budget`` examples drawn uniformly within each class (shares as ``class_budgets``), weight 1: the
    example-level baseline per-class GradMatch must beat."""
    indices: list[int] = []
    for _, members, share in _class_shares(labels, budget):
        indices += members[torch.randperm(len(members), generator=generator)[:share]].tolist()
    return Selection(indices, [1.0] * len(indices), matched=0, residual=0.0)
