"""Seeded random directions: any tensor's direction, or any of its rows, regenerated from a few integers.

A direction is never stored. Each tensor's slice of direction ``u_q`` is regenerated from a seed derived from
(base seed, step, query, parameter index), so a resumed run draws exactly the directions an uninterrupted one
would, and a client update is fully described by a list of (seed, scalar) pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from hosl_lightning.core.options import check_choice, check_int

DIRECTIONS = ("gaussian", "rademacher")
EMBEDDING_DIRECTIONS = ("dense", "sparse")  # a token-embedding table's direction: every row, or the rows read
_MASK64 = (1 << 64) - 1
SPARSE_ROW = _MASK64  # the "chunk" index of a sparse direction's seed (its rows are hashed in, see sparse_rows)


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


_MASK32 = (1 << 32) - 1
_LEVEL_BITS = 16


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of each entry of an int64 tensor of values in [0, 2**32), in place.

    Its multipliers are below 2**31, so no product leaves int64: the same integers on any device, in any
    position of a tensor (a float function such as ``log`` may round differently in a vectorised loop's tail).
    """
    x.bitwise_xor_(x >> 16).mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(0x735A2D97).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 15)


@functools.lru_cache(maxsize=8)
def _gaussian_levels(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 2**16 quantiles of N(0, 1) at (i + 1/2) / 2**16, scaled to unit variance: a 16-bit index picks a
    gaussian value by lookup, which is exact wherever it runs."""
    levels = torch.special.ndtri((torch.arange(1 << _LEVEL_BITS, dtype=torch.float64) + 0.5) / (1 << _LEVEL_BITS))
    return (levels / levels.square().mean().sqrt()).to(device=device, dtype=dtype)


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

    def sparse_rows(self, step: int, query: int, key: int, rows: Tensor, like: Tensor) -> Tensor:
        """A sparse direction's rows ``rows`` (row ids of ``like``); every other row of the direction is zero.

        Each entry is a function of (seed, step, query, key, row, column) alone, so a row's direction does not
        depend on which other rows the step reads, and probes, updates and replays draw the same values. All rows
        are drawn at once, by integer hashing (``_hash32``) over a tensor of counters: a fixed handful of
        vectorised calls whatever the number of rows, where a generator per row cost two launches a row.
        """
        seed = self.seed_for(step, query, key, SPARSE_ROW)
        low, high = seed & _MASK32, (seed >> 32) & _MASK32
        ids = rows.to(like.device, torch.int64).reshape(-1, 1)
        first, second = _hash32(_hash32(ids ^ low) ^ high), _hash32(_hash32(ids ^ high) ^ low)  # 64 bits a row
        width = like[0].numel() if like.ndim > 1 else 1
        counters = first + torch.arange(width, device=like.device)
        bits = _hash32(_hash32(counters.bitwise_and_(_MASK32)).bitwise_xor_(second))
        if self.kind == "gaussian":
            values = _gaussian_levels(like.device, like.dtype)[bits >> (32 - _LEVEL_BITS)]
        else:
            values = (bits >> 31).to(like.dtype).mul_(2).sub_(1)
        return values.reshape(ids.shape[0], *like.shape[1:])

    def _draw(self, step: int, query: int, key: int, chunk: int, shape: tuple[int, ...] | torch.Size,
              like: Tensor) -> Tensor:
        generator = torch.Generator(device=like.device)
        generator.manual_seed(self.seed_for(step, query, key, chunk))
        if self.kind == "gaussian":
            return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
        signs = torch.randint(0, 2, shape, generator=generator, device=like.device, dtype=torch.int8)
        return signs.to(like.dtype).mul_(2).sub_(1)


class ParameterDirections:
    """The seeded directions of one optimizer's zeroth-order parameters, which its probes, tangents and updates draw.

    Each parameter's direction key is its position in ``named`` plus ``first_key`` (a server process's share of an
    all-ZO split continues the client's keys, so both draw exactly the directions one optimizer over both halves
    would), and ``sampler`` draws its direction from (step, query, key). A token-embedding table's direction is also
    drawn by rows (:meth:`row_directions`): the dense direction's, or a sparse one's, whose support (the rows the
    step's probes read, which its update moves) is recorded here for the step (:meth:`support`).

    :class:`hosl_lightning.core.zo.ZOSGD` holds one (``parameter_directions``) and draws its updates through it;
    probes (:mod:`hosl_lightning.core.perturbation`) and tangents (:mod:`hosl_lightning.core.tangents`) take it, so
    all three draw the same ``u_q``.
    """

    def __init__(self, named: Sequence[tuple[str, Tensor]], sampler: DirectionSampler, first_key: int = 0,
                 embedding_directions: str = "dense") -> None:
        check_choice("embedding_directions", embedding_directions, EMBEDDING_DIRECTIONS)
        self.sampler = sampler
        self.names = {id(p): n for n, p in named}  # id(parameter) -> its name, for messages
        self.keys = {id(p): first_key + index for index, (_, p) in enumerate(named)}  # id(parameter) -> direction key
        self.embedding_directions = embedding_directions
        self._support: dict[int, Tensor] = {}  # key -> the sorted rows a sparse direction covers this step
        self._support_step: int | None = None

    def row_directions(self, weight: Tensor, step: int, query: int, ids: Tensor) -> Tensor:
        """``u(step, query)[ids]`` for an embedding table: the dense direction's rows, or the sparse one's, whose
        support (the rows the update moves) is every row the step's probes read."""
        key = self.keys[id(weight)]
        if self.embedding_directions == "dense":
            return self.sampler.rows(step, query, key, weight, ids)
        if self._support_step != step:
            self._support, self._support_step = {}, step
        read, where = torch.unique(ids, return_inverse=True)
        known = self._support.get(key)
        self._support[key] = read if known is None else torch.unique(torch.cat([known, read]))
        return self.sampler.sparse_rows(step, query, key, read, weight)[where]

    def support(self, step: int) -> dict[int, Tensor]:
        """For each key with a sparse direction, the sorted rows ``step``'s probes have read (none for other steps)."""
        return dict(self._support) if self._support_step == step else {}
