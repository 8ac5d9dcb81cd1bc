"""The statistics of one observation pass over a block: forward pre-hooks, nothing else.

A pass runs the calibration batches through a block up to the last group's input. A pre-hook
on each group's first linear accumulates that group's statistics as exact (sum, count)
accumulators (`GroupStats`: the Hessian `X^T X`, and AWQ's `mean |x|` per channel), and, for
the AWQ search, keeps the group's inputs and the calls of its consumer module (`Capture`).
How the batches are run (stage reuse, early stop) is the caller's business.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from shardquant.algorithms import awq
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.smoothquant import ChannelMax
from shardquant.calib.steps import GroupStats


@dataclass
class Capture:
    """What an AWQ scale search needs of one group: its inputs (one tensor per batch), the
    calls (args, kwargs) of its consumer module, and the group's Hessian accumulator (the
    Gram matrix of the inputs, for linear consumers)."""

    inputs: list[Tensor] = field(default_factory=list)
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    hessian: HessianAccumulator | None = None


@dataclass
class Observation:
    """The outcome of one pass: statistics and captures by group, the inputs of the last
    group's first linear (one per batch: a stage cache may finish its stage from them), and
    the seconds the hooks spent accumulating."""

    stats: dict[str, GroupStats] = field(default_factory=dict)
    captures: dict[str, Capture] = field(default_factory=dict)
    last_inputs: list[Tensor] = field(default_factory=list)
    stats_s: float = 0.0


@contextmanager
def observing(
    block: nn.Module, groups: list[tuple[str, str]], *, channel: bool, capture: dict[str, str | None],
    hessian: bool = True, absmax: bool = False,
) -> Iterator[Observation]:
    """Hooks on `block` for one pass; run the batches inside, the hooks go on leaving.

    `groups` is [(group name, its first linear)]; every group gets a Hessian accumulator (unless
    not `hessian`), with `channel` an AWQ `ChannelStats`, and with `absmax` a `ChannelMax`. `capture` maps a group to its consumer module (or
    None) when its inputs (and the consumer's calls) must be kept for the AWQ search.
    """
    obs = Observation()
    handles = []
    for gname, first_name in groups:
        first = block.get_submodule(first_name)
        dev = first.weight.device
        n_in = first.weight.shape[-1]  # a linear's in_features, or a router's (not an nn.Linear)
        st = obs.stats[gname] = GroupStats(
            HessianAccumulator(n_in, device=dev) if hessian else None,
            awq.ChannelStats(n_in, device=dev) if channel else None,
            absmax=ChannelMax(n_in, device=dev) if absmax else None,
        )
        cap = None
        if gname in capture:
            cap = obs.captures[gname] = Capture(hessian=st.hessian)
            consumer = capture[gname]
            if consumer:

                def call_hook(_mod, args, kwargs, cap=cap):
                    cap.calls.append((args, kwargs))

                handles.append(
                    block.get_submodule(consumer).register_forward_pre_hook(call_hook, with_kwargs=True)
                )

        keep = obs.last_inputs if (gname, first_name) == groups[-1] else None

        def hook(_mod, args, st=st, cap=cap, keep=keep):
            t0 = time.perf_counter()
            x = args[0].detach()
            if cap is not None:
                cap.inputs.append(x)
            if keep is not None:
                keep.append(x)
            if st.hessian is not None:
                st.hessian.add(x)
            if st.channel is not None:
                st.channel.add(x)
            if st.absmax is not None:
                st.absmax.add(x)
            obs.stats_s += time.perf_counter() - t0

        handles.append(first.register_forward_pre_hook(hook))
    try:
        yield obs
    finally:
        for h in handles:
            h.remove()
