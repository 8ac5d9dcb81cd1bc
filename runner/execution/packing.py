"""Who solves what: a phase's linears as solve units (whole, or row slices) bin-packed onto
workers by cost. Plain numbers, no torch: the Ray executor packs its solves with these, and
`shardquant plan` sizes each worker from the same packing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shardquant.config import GPTQ_METHODS


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous share [start, end) of n items that worker `rank` of `world` owns; the
    first ``n % world`` ranks get one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def unit_cost(rows: int, in_features: int) -> float:
    """A solve's cost: GPTQ's column loop over `rows` (rows·in²) plus the factorization (in³),
    which every worker that gets a unit of the group pays again."""
    return float(rows * in_features * in_features + in_features**3)


@dataclass(frozen=True)
class Unit:
    """One solve: linear `index` of the list packed, whole (`rows` None) or rows [a, b)."""

    index: int
    rows: tuple[int, int] | None
    cost: float


def pack_units(linears: Sequence[tuple[str, int, int]], world: int, row_split: str = "auto") -> list[Unit]:
    """The units of a solve of `linears` [(kind, out, in)] on `world` workers (world > 1).

    One unit per linear, except that a linear of a row-splittable kind becomes k row slices:
    'auto' k = min(world, out, ceil(out·in² / average)) with average = the whole units' total
    cost / world, so only a linear whose column loop exceeds the average load per worker is
    split; 'always' k = min(world, out); 'never' k = 1."""
    average = sum(unit_cost(o, i) for _, o, i in linears) / world
    units: list[Unit] = []
    for index, (kind, out_f, in_f) in enumerate(linears):
        k = 1
        if kind in GPTQ_METHODS and row_split == "always":
            k = min(world, out_f)
        elif kind in GPTQ_METHODS and row_split == "auto":
            k = min(world, out_f, math.ceil(out_f * in_f * in_f / average))
        if k == 1:
            units.append(Unit(index, None, unit_cost(out_f, in_f)))
            continue
        for r in range(k):
            a, b = split_range(out_f, k, r)
            units.append(Unit(index, (a, b), unit_cost(b - a, in_f)))
    return units


def assign(costs: Sequence[float], workers: int) -> list[int]:
    """Greedy bin packing: the worker of each item (largest first onto the least loaded)."""
    load = [0.0] * workers
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda k: -costs[k]):
        k = min(range(workers), key=lambda w: (load[w], w))
        owner[i] = k
        load[k] += costs[i]
    return owner
