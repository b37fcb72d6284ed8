"""The batches of a subset epoch: candidate batches to choose from, and the loader pieces that serve the chosen ones.

Kept apart from the choosing (``selection``): these only cut, order and weight batches, and need no model.
Each served batch carries its weights as ``loss_weight`` (one number, or one per example when they differ), which
the split model multiplies into its losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from hosl_lightning.tuning.matching import Selection

WeightedIndex = tuple[int, float]


class WeightedDataset(Dataset):
    """Fetches ``dataset[index]`` for an ``(index, weight)`` pair and keeps the weight beside it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: WeightedIndex) -> tuple[Any, float]:
        index, weight = item
        return self.dataset[index], weight


@dataclass(frozen=True)
class WeightedCollate:
    """The loader's own collate, plus the weights as ``loss_weight``: a scalar when the batch's examples share one
    (a batch chosen whole), else one per example (examples chosen one by one)."""

    collate: Callable[[list[Any]], Any]

    def __call__(self, items: list[tuple[Any, float]]) -> dict[str, Any]:
        batch = self.collate([example for example, _ in items])
        if not isinstance(batch, dict):
            raise TypeError(f"SubsetSelection needs batches that are dicts (to add 'loss_weight'), got {type(batch).__name__}")
        weights = [weight for _, weight in items]
        shared = all(weight == weights[0] for weight in weights)
        batch["loss_weight"] = torch.tensor(weights[0] if shared else weights, dtype=torch.float32)
        return batch


class SelectedBatches(Sampler[list[WeightedIndex]]):
    """Yields the chosen batches (as ``(index, weight)`` lists) in an order drawn from (seed, epoch, selection).

    An epoch has ``length`` batches whatever the selection, so Lightning's epoch bookkeeping holds. A new
    selection takes effect at once, even mid-epoch: the iterator reads the current order on every step. The
    order depends on nothing else, so a resumed run sees the same batches (Lightning calls ``set_epoch``);
    ``skip`` makes the next epoch start where a checkpoint taken mid-epoch left off.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed = length, seed
        self.batches: list[list[WeightedIndex]] = []
        self.epoch = self.round = self.skip = 0
        self._order: list[int] = []

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._shuffle()

    def update(self, batches: list[list[WeightedIndex]], round: int) -> None:
        self.batches, self.round = batches, round
        self._shuffle()

    def _shuffle(self) -> None:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.round)
        self._order = torch.randperm(len(self.batches), generator=generator).tolist()

    def __iter__(self) -> Iterator[list[WeightedIndex]]:
        if not self.batches:
            raise RuntimeError("SubsetSelection has not chosen batches yet: it chooses when training starts")
        start, self.skip = self.skip, 0
        for position in range(start, self.length):
            yield self.batches[self._order[position % len(self._order)]]


def subset_length(fraction: float, candidates: int) -> int:
    """Batches in a subset epoch: ``fraction`` of the candidates, rounded up (0.1 of 30 is 3, not 4), at least 1."""
    return max(1, math.ceil(round(fraction * candidates, 9)))


def partition(size: int, batch_size: int, generator: torch.Generator, labels: Tensor | None = None) -> list[list[int]]:
    """The candidates: a seeded shuffle of all examples cut into batches (the last one may be short).

    With ``labels`` the shuffle is stratified: each class's examples are spread evenly along the order, so every
    batch holds the classes in the data's proportions, off by fewer than two examples per class.
    """
    if labels is None:
        order = torch.randperm(size, generator=generator).tolist()
    else:
        if len(labels) != size:
            raise ValueError(f"{len(labels)} labels for {size} examples")
        position = torch.empty(size, dtype=torch.float64)
        for label in labels.unique():
            members = (labels == label).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            jitter = torch.rand(len(members), generator=generator, dtype=torch.float64)
            position[members] = (torch.arange(len(members), dtype=torch.float64) + jitter) / len(members)
        order = position.argsort().tolist()
    return [order[i : i + batch_size] for i in range(0, size, batch_size)]


def class_labels(dataset: Any) -> Tensor | None:
    """Each example's class (an integer ``label`` attribute or key, as prompt classification data has), or None."""
    labels = []
    for index in range(len(dataset)):
        example = dataset[index]
        label = example.get("label") if isinstance(example, dict) else getattr(example, "label", None)
        if isinstance(label, Tensor) and label.numel() == 1:
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, int):
            return None
        labels.append(label)
    return torch.tensor(labels, dtype=torch.long)


def weighted_batches(candidates: list[list[int]], chosen: Selection) -> list[list[WeightedIndex]]:
    """The chosen candidate batches, each example with its batch's weight."""
    return [[(i, w) for i in candidates[c]] for c, w in zip(chosen.indices, chosen.weights)]
