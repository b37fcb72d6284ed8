"""Which examples a split uses, and in which order training sees them.

Everything here is drawn from seeds alone, so a sample can be repeated (MeZO's samples included) and a
run resumed at an epoch boundary sees the same order as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from hosl_lightning.core.options import UserError


def seeded_order(size: int, seed: int) -> list[int]:
    """A permutation of ``range(size)`` drawn from ``seed`` alone.

    The same one MeZO draws (``np.random.seed(seed); np.random.permutation(size)``), so a MeZO-style
    sample (first n of the permutation) picks the same examples from the same data.
    """
    return np.random.RandomState(seed).permutation(size).tolist()


def k_per_class(
    order: Sequence[int], classes: Sequence[int], k: int, names: Sequence[Hashable], where: str
) -> list[int]:
    """The first ``k`` examples of each class in ``order`` (kept in that order); an error if a class has fewer."""
    picked: dict[int, list[int]] = {index: [] for index in range(len(names))}
    for i in order:
        if len(picked[classes[i]]) < k:
            picked[classes[i]].append(i)
    short = {names[c]: len(found) for c, found in picked.items() if len(found) < k}
    if short:
        raise UserError(f"k_shot={k} examples per class, but {where} has fewer for labels {short} (label: available)")
    chosen = {i for found in picked.values() for i in found}
    return [i for i in order if i in chosen]


def sample_train(
    classes: Sequence[int],
    *,
    seed: int,
    names: Sequence[Hashable],
    where: str,
    k_shot: int | None = None,
    num_train: int | None = None,
    carve: int = 0,
) -> tuple[list[int], list[int]]:
    """Training indices, and ``carve`` validation indices taken from the same split, disjoint from them.

    ``k_shot``: k examples per class (seeded, balanced). ``num_train``: the first n of the seeded order
    (at most all). Neither: everything, less the carved examples. The carved validation examples are the
    next ones in the seeded order after the training sample, as in MeZO (which draws
    ``num_train + num_dev`` examples and keeps the last ``num_dev`` as its dev set).
    """
    order = seeded_order(len(classes), seed)
    if k_shot is not None:
        train = k_per_class(order, classes, k_shot, names, where)
    elif num_train is not None:
        train = order[:num_train]
    elif carve:
        train = order[: max(0, len(order) - carve)]
    else:
        train = list(range(len(classes)))
    if not carve:
        return train, []
    taken = set(train)
    return train, [i for i in order if i not in taken][:carve]


class EpochShuffle(Sampler[int]):
    """A shuffle drawn from (seed, epoch) alone, so a run resumed at an epoch boundary sees the same order.

    Lightning calls ``set_epoch`` on samplers that have it before every epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
