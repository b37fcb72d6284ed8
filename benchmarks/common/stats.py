"""Paired comparisons of two methods' test runs: the difference in accuracy points with a bootstrap interval over
seeds and examples, and its one formatting."""

from __future__ import annotations

import random
import statistics
from typing import Any


def mean_difference(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean accuracy of ``a`` minus ``b`` in points: ``bootstrap_difference``'s point, without its draws."""
    return 100 * (statistics.mean(map(statistics.mean, a)) - statistics.mean(map(statistics.mean, b)))


def bootstrap_difference(a: list[list[int]], b: list[list[int]], draws: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy of ``a`` minus ``b`` in points, with a paired 95% bootstrap interval over seeds and examples.

    ``a[s]`` and ``b[s]`` are seed ``s``'s per-example correctness on the same test examples: each draw resamples
    the seeds, then the examples, and takes the same picks on both sides.
    """
    rng = random.Random(seed)
    seeds, examples = len(a), len(a[0])
    point = mean_difference(a, b)
    differences = [[x - y for x, y in zip(a[s], b[s])] for s in range(seeds)]
    values = []
    for _ in range(draws):
        picked = [differences[rng.randrange(seeds)] for _ in range(seeds)]
        rows = [rng.randrange(examples) for _ in range(examples)]
        values.append(100 * sum(d[i] for d in picked for i in rows) / (seeds * examples))
    values.sort()
    return point, values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def paired_correct(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
    """The per-example correctness of two methods' test runs over the seeds both finished, seed by seed."""
    seeds = sorted({r["config"]["seed"] for r in a} & {r["config"]["seed"] for r in b})
    pick = lambda runs: [next(r["test"]["correct"] for r in runs if r["config"]["seed"] == s) for s in seeds]
    return pick(a), pick(b)


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, float, float, int] | None:
    """``a`` minus ``b`` over the seeds both finished: the bootstrap difference and how many seeds it pairs."""
    x, y = paired_correct(a, b)
    return (*bootstrap_difference(x, y), len(x)) if x else None


def paired_point(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """``a`` minus ``b`` in points over the seeds both finished (no interval: a verdict needs only the point)."""
    x, y = paired_correct(a, b)
    return mean_difference(x, y) if x else float("nan")


def difference_cell(difference: tuple[float, ...] | None, seeds: bool = False, missing: str = "-") -> str:
    """A paired difference from ``paired`` in points, with its 95% interval (and the seeds it pairs)."""
    if difference is None:
        return missing
    cell = f"{difference[0]:+.1f} [{difference[1]:+.1f}, {difference[2]:+.1f}]"
    return cell + (f" ({difference[3]})" if seeds else "")
