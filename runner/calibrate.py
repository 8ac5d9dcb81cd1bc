"""Quantizing one materialized block: observe its inputs, solve each linear, write back.

Linears that share an input (an adapter's InputGroup) share one Hessian and one
factorization. With true-sequential order each group is observed after the earlier groups
were quantized, so later layers correct for the error of earlier ones (GPTQ paper).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from shardquant.algorithms.gptq import GPTQSolver
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import QuantizedWeight, QuantSpec
from shardquant.algorithms.rtn import quantize_rtn

from .adapters import Adapter, InputGroup
from .config import QuantConfig


@dataclass
class LayerResult:
    """What solving one linear produced."""

    weight: QuantizedWeight
    loss: float


@dataclass
class BlockProfile:
    """Seconds spent per phase while quantizing one block."""

    forward_s: float = 0.0
    stats_s: float = 0.0
    solve_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def quant_spec(q: QuantConfig) -> QuantSpec:
    """The algorithm-level scheme of a config."""
    return QuantSpec(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)


def is_ignored(name: str, patterns: list[str]) -> bool:
    """True when a module name matches `quant.ignore`: exact, dotted suffix, or 're:REGEX'."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def _set_weight(linear: nn.Linear, qw: QuantizedWeight) -> None:
    with torch.no_grad():
        linear.weight.copy_(qw.dequantize().to(device=linear.weight.device, dtype=linear.weight.dtype))


def quantize_block(
    block: nn.Module,
    block_name: str,
    adapter: Adapter,
    q: QuantConfig,
    observe: Callable[[nn.Module | None], None],
    profile: BlockProfile | None = None,
) -> dict[str, LayerResult]:
    """Quantize the linears of a loaded block in place (weights become fake-quantized).

    `observe(stop_at)` runs every calibration batch through the block, each forward ending
    before `stop_at` runs (None: to the end); it is called once per observation phase, and
    stops at the last input the phase needs, so early groups cost almost no compute.
    Returns results keyed by block-relative linear name.
    """
    profile = profile or BlockProfile()
    if q.method == "none":
        return {}
    spec = quant_spec(q)
    wanted = [
        InputGroup(g.name, g.prev, tuple(n for n in g.linears if not is_ignored(f"{block_name}.{n}", q.ignore)))
        for g in adapter.groups
    ]
    groups = [g for g in wanted if g.linears]
    results: dict[str, LayerResult] = {}
    if q.method == "rtn":
        t = time.perf_counter()
        for g in groups:
            for name in g.linears:
                lin = block.get_submodule(name)
                w = lin.weight.float()
                qw = quantize_rtn(w, spec)
                loss = float((w - qw.dequantize().to(w.device)).pow(2).sum())
                _set_weight(lin, qw)
                results[name] = LayerResult(qw, loss)
        profile.solve_s += time.perf_counter() - t
        return results
    phases = [[g] for g in groups] if q.true_sequential else [groups]
    for phase in phases:
        accs: dict[str, HessianAccumulator] = {}
        handles = []
        stats_time = [0.0]
        for g in phase:
            first = block.get_submodule(g.linears[0])
            acc = HessianAccumulator(first.in_features, device=first.weight.device)
            accs[g.name] = acc

            def hook(_mod, args, acc=acc, stats_time=stats_time):
                t0 = time.perf_counter()
                acc.add(args[0])
                stats_time[0] += time.perf_counter() - t0

            handles.append(first.register_forward_pre_hook(hook))
        t = time.perf_counter()
        try:
            observe(block.get_submodule(phase[-1].linears[0]))
        finally:
            for h in handles:
                h.remove()
        profile.forward_s += time.perf_counter() - t - stats_time[0]
        profile.stats_s += stats_time[0]
        t = time.perf_counter()
        for g in phase:
            solver = GPTQSolver(accs[g.name].hessian(), damp=q.damp, act_order=q.act_order)
            for name in g.linears:
                lin = block.get_submodule(name)
                res = solver.quantize(lin.weight, spec, block_size=q.block_size, static_groups=q.static_groups)
                _set_weight(lin, res.weight)
                results[name] = LayerResult(res.weight, float(res.loss))
            del solver
        del accs
        profile.solve_s += time.perf_counter() - t
    return results
