"""Quantizing one materialized block: observe its inputs, solve each linear, write back.

Linears that share an input (an adapter's InputGroup) share one Hessian and one
factorization. With true-sequential order each group is observed after the earlier groups
were quantized, so later layers correct for the error of earlier ones (GPTQ paper).

AWQ (`awq`, `awq+gptq`) goes group by group the same way: capture the group's inputs (and the
call of its consumer module), search the scales on the consumer's output, fold them into the
group's linears and the op before them, then quantize the scaled weights (RTN with a clip
search, or GPTQ with the Hessian of the scaled inputs).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardquant.algorithms import awq
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
    notes: list[str] = field(default_factory=list)  # things a person should know (report.json)
    awq: dict[str, dict[str, Any]] = field(default_factory=dict)  # AWQ search outcome per group


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
    if q.method in ("awq", "awq+gptq"):
        return _quantize_block_awq(block, block_name, adapter, q, observe, profile)
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


# --- AWQ ----------------------------------------------------------------------------------


def scale_blocker(block: nn.Module, group: InputGroup) -> str | None:
    """Why the input of `group` cannot take AWQ scales in this block, or None when it can.

    The op before the group must absorb 1/s exactly: a norm with a per-channel weight of the
    input size, or a linear whose output rows are the group's input channels (with
    grouped-query attention v_proj has fewer outputs than o_proj has inputs, so no).
    """
    if not group.consumer:
        return f"{group.name}: the adapter names no consumer module to measure the scale search"
    lins = [block.get_submodule(n) for n in group.linears]
    n_in = lins[0].in_features
    if any(lin.in_features != n_in for lin in lins):
        return f"{group.name}: its linears read inputs of different sizes"
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        if prev.out_features != n_in:
            return (
                f"{group.name}: {group.prev} has {prev.out_features} outputs but {group.linears[0]} reads "
                f"{n_in} inputs (grouped-query attention?), so {group.prev} cannot absorb the scales"
            )
        return None
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n_in,):
        return f"{group.name}: {group.prev} has no per-channel weight of size {n_in} to absorb the scales"
    return None


def fold_scales(
    block: nn.Module, group: InputGroup, s: torch.Tensor, results: dict[str, LayerResult] | None = None
) -> None:
    """Apply input scales `s` to a group: its linears' columns × s, the op before it ÷ s.

    Exact before rounding: the block computes the same function. When the previous linear
    was already quantized (its result is in `results`), its quantized weight's row scales are
    divided instead, so its codes stay valid, and the block's weight is set to match. Call
    `scale_blocker` first; this does not check shapes.
    """
    for name in group.linears:
        awq.scale_columns_(block.get_submodule(name).weight.data, s)
    prev = block.get_submodule(group.prev)
    bias = getattr(prev, "bias", None)
    bias = bias.data if isinstance(bias, torch.Tensor) else None
    if isinstance(prev, nn.Linear):
        if results is not None and group.prev in results:
            old = results[group.prev]
            qw = awq.rescale_rows(old.weight, s)
            _set_weight(prev, qw)
            results[group.prev] = LayerResult(qw, old.loss)
            if bias is not None:
                bias.div_(s.to(device=bias.device, dtype=bias.dtype))
        else:
            awq.fold_into_rows_(prev.weight.data, bias, s)
    else:
        awq.fold_into_norm_(prev.weight.data, bias, s)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclass
class _Capture:
    """What one observation pass recorded for one group."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # the linears' input, per batch
    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # the consumer's (args, kwargs)
    stats: awq.ChannelStats | None = None
    hessian: HessianAccumulator | None = None


def _awq_search(
    block: nn.Module, group: InputGroup, quantized: tuple[str, ...], cap: _Capture, q: QuantConfig, spec: QuantSpec
) -> awq.ScaleSearch:
    """Grid search of the group's scales on its consumer's output (weights restored after)."""
    consumer = block.get_submodule(group.consumer)
    lins = {n: block.get_submodule(n) for n in group.linears}
    originals = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    with torch.no_grad():
        refs = [_first(consumer(*a, **kw)) for a, kw in cap.calls]

    def loss(s: torch.Tensor) -> float:
        with torch.no_grad():
            for n, lin in lins.items():
                if n in quantized:
                    lin.weight.copy_(awq.scaled_fake_quantize(originals[n], s, spec).to(lin.weight.dtype))
                else:
                    lin.weight.copy_(originals[n])
            total, count = 0.0, 0
            for (a, kw), ref in zip(cap.calls, refs, strict=True):
                y = _first(consumer(*a, **kw))
                total += float((y.float() - ref.float()).pow(2).sum())
                count += y.numel()
        return total / count

    w_mean = awq.weight_mean([originals[n] for n in quantized], spec) if q.awq_duo_scaling else None
    try:
        return awq.search_scales(cap.stats.mean(), loss, grid=q.awq_grid, w_mean=w_mean)
    finally:
        with torch.no_grad():
            for n, lin in lins.items():
                lin.weight.copy_(originals[n])


def _output_error(inputs: list[torch.Tensor], s: torch.Tensor | None, delta: torch.Tensor) -> float:
    """||X' delta^T||^2 / rows over the captured inputs, X' = X / s: the layer's output error,
    the quantity GPTQ's loss measures (1/2 tr(delta H delta^T) with H = 2 X'^T X' / rows)."""
    total, count = 0.0, 0
    for x in inputs:
        rows = x.reshape(-1, x.shape[-1]).float()
        if s is not None:
            rows = rows / s
        total += float((rows @ delta.T).pow(2).sum())
        count += rows.shape[0]
    return total / max(count, 1)


def _quantize_block_awq(
    block: nn.Module,
    block_name: str,
    adapter: Adapter,
    q: QuantConfig,
    observe: Callable[[nn.Module | None], None],
    profile: BlockProfile,
) -> dict[str, LayerResult]:
    """AWQ (then RTN with clip search, or GPTQ) of one block, group by group."""
    spec = quant_spec(q)
    use_gptq = q.method == "awq+gptq"
    # (group with every linear, the linears that get quantized); fully ignored groups are left alone.
    work = []
    for g in adapter.groups:
        quantized = tuple(n for n in g.linears if not is_ignored(f"{block_name}.{n}", q.ignore))
        if quantized:
            work.append((g, quantized))
    results: dict[str, LayerResult] = {}
    phases = [[w] for w in work] if q.true_sequential else [work]
    for phase in phases:
        caps: dict[str, _Capture] = {}
        handles = []
        stats_time = [0.0]
        for g, _ in phase:
            cap = caps[g.name] = _Capture()
            first = block.get_submodule(g.linears[0])
            cap.stats = awq.ChannelStats(first.in_features, device=first.weight.device)
            if use_gptq:
                cap.hessian = HessianAccumulator(first.in_features, device=first.weight.device)
            if g.consumer:

                def call_hook(_mod, args, kwargs, cap=cap):
                    cap.calls.append((args, kwargs))

                handles.append(block.get_submodule(g.consumer).register_forward_pre_hook(call_hook, with_kwargs=True))

            def input_hook(_mod, args, cap=cap, stats_time=stats_time):
                t0 = time.perf_counter()
                x = args[0].detach()
                cap.inputs.append(x)
                cap.stats.add(x)
                if cap.hessian is not None:
                    cap.hessian.add(x)
                stats_time[0] += time.perf_counter() - t0

            handles.append(first.register_forward_pre_hook(input_hook))
        t = time.perf_counter()
        try:
            observe(block.get_submodule(phase[-1][0].linears[0]))
        finally:
            for h in handles:
                h.remove()
        profile.forward_s += time.perf_counter() - t - stats_time[0]
        profile.stats_s += stats_time[0]

        for g, quantized in phase:
            cap = caps.pop(g.name)
            t = time.perf_counter()
            s = None
            blocker = scale_blocker(block, g)
            if blocker is not None:
                profile.notes.append(f"{block_name}: AWQ scales skipped for {blocker}")
            else:
                found = _awq_search(block, g, quantized, cap, q, spec)
                profile.awq[g.name] = {
                    "ratio": found.ratio, "loss": found.loss, "identity_loss": found.identity_loss,
                }
                if found.ratio is not None:
                    s = found.scales.to(block.get_submodule(g.linears[0]).weight.device)
            originals = {n: block.get_submodule(n).weight.detach().float().clone() for n in quantized}
            if s is not None:
                fold_scales(block, g, s, results)
            profile.extra["search_s"] = profile.extra.get("search_s", 0.0) + time.perf_counter() - t
            solver = None
            if use_gptq:
                H = cap.hessian.hessian()
                solver = GPTQSolver(H if s is None else awq.scaled_hessian(H, s), damp=q.damp, act_order=q.act_order)
            clip_x = None
            for name in quantized:
                lin = block.get_submodule(name)
                w = originals[name] if s is None else originals[name] * s
                if solver is not None:
                    res = solver.quantize(w, spec, block_size=q.block_size, static_groups=q.static_groups)
                    qw, loss = res.weight, float(res.loss)
                else:
                    target = w
                    if q.awq_clip and name not in g.clip_skip:
                        if clip_x is None:
                            clip_x = awq.subsample_rows(cap.inputs, q.awq_clip_tokens).to(w.device)
                            if s is not None:
                                clip_x = clip_x / s
                        found_clip = awq.search_clip(
                            w, clip_x, spec, grid=q.awq_clip_grid, max_shrink=q.awq_clip_max_shrink
                        )
                        target = awq.apply_clip(w, spec, found_clip.ratio)
                    qw = quantize_rtn(target, spec)
                    loss = _output_error(cap.inputs, s, w - qw.dequantize().to(w.device))
                _set_weight(lin, qw)
                results[name] = LayerResult(qw, loss)
            del solver, cap
            profile.solve_s += time.perf_counter() - t
    return results
