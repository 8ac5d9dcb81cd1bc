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

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from shardquant.algorithms import awq
from shardquant.algorithms.floatq import FloatQuantizedWeight, FloatSpec
from shardquant.algorithms.gptq import GPTQSolver
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import QuantizedWeight, QuantSpec, concat_rows
from shardquant.algorithms.smoothquant import ChannelMax
from shardquant.config import AWQ_METHODS, QuantConfig, is_ignored
from shardquant.model.adapters import Adapter, InputGroup, phases
from shardquant.model.experts import num_experts


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
    experts: dict[str, Any] = field(default_factory=dict)  # a sparse block's token counts, fallbacks


def quant_spec(q: QuantConfig, dtype: torch.dtype = torch.float32) -> QuantSpec | FloatSpec:
    """The algorithm-level quantizer of a config: integer ``QuantSpec`` or a float format's
    ``FloatSpec``. FP8 scales are rounded to the compute ``dtype`` they are exported in."""
    p = q.weight_preset
    if p is None or p.kind == "int":
        return QuantSpec(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)
    if p.kind == "fp8":
        scale_dtype = None if dtype == torch.float32 else dtype
        if p.strategy == "block":
            return FloatSpec.fp8_block(p.block_rows, p.group_size, scale_dtype=scale_dtype)
        if p.strategy == "tensor":
            return FloatSpec.fp8_tensor(scale_dtype)
        return FloatSpec.fp8_channel(scale_dtype)
    return FloatSpec.nvfp4() if p.kind == "nvfp4" else FloatSpec.mxfp4()


def _set_weight(linear: nn.Linear, qw: QuantizedWeight | FloatQuantizedWeight) -> None:
    with torch.no_grad():
        linear.weight.copy_(qw.dequantize().to(device=linear.weight.device, dtype=linear.weight.dtype))


# --- AWQ ----------------------------------------------------------------------------------


def scale_blocker(block: nn.Module, group: InputGroup, *, need_consumer: bool = True) -> str | None:
    """Why the input of `group` cannot take AWQ scales in this block, or None when it can.

    The op before the group must absorb 1/s exactly: a norm with a per-channel weight of the
    input size, or a linear whose output rows are the group's input channels (with
    grouped-query attention v_proj has fewer outputs than o_proj has inputs, so no).
    """
    if need_consumer and not group.consumer:
        return f"{group.name}: the adapter names no consumer module to measure the scale search"
    if group.no_scale:
        return f"{group.name}: {group.no_scale}"
    lins = [block.get_submodule(n) for n in group.linears]
    n_in = lins[0].weight.shape[-1]  # a router is no nn.Linear, but has a [out, in] weight
    if any(lin.weight.shape[-1] != n_in for lin in lins):
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


# --- the steps of one block, driven through an executor ------------------------------------


@dataclass
class GroupStats:
    """One worker's statistics of one input group (merged across workers by addition)."""

    hessian: HessianAccumulator | None = None
    channel: awq.ChannelStats | None = None
    solver: GPTQSolver | None = None  # the factorized Hessian, once a GPTQ solve built it
    absmax: ChannelMax | None = None  # max x, max -x per channel (static input scales, SmoothQuant): merged by max


def merge_stats(
    parts: Iterable[dict[str, GroupStats]], *, own_first: bool = False, only: set[str] | None = None
) -> dict[str, GroupStats]:
    """Sum per-worker statistics group by group (exact: sums and counts add), one part at a
    time; with `only`, just those groups (a worker sums the groups it solves, and never reads
    the others' received buffers). The parts are left untouched (received ones may be
    read-only buffers), except with `own_first`: the first part is this worker's own, which
    becomes the running sum, so no in×in copy is made (the solve may then spend it, see
    `solvers.factorize`)."""
    out: dict[str, GroupStats] = {}
    for k, part in enumerate(parts):
        if only is not None:
            part = {name: st for name, st in part.items() if name in only}
        if k == 0 and own_first:
            out = {name: GroupStats(st.hessian, st.channel, absmax=st.absmax) for name, st in part.items()}
            continue
        for name, st in part.items():
            acc = out.setdefault(name, GroupStats())
            if st.hessian is not None:
                if acc.hessian is None:
                    acc.hessian = HessianAccumulator(st.hessian.in_features, st.hessian.sum.device, st.hessian.sum.dtype)
                acc.hessian.merge(st.hessian)
            if st.channel is not None:
                if acc.channel is None:
                    acc.channel = awq.ChannelStats(st.channel.in_features, st.channel.sum.device, st.channel.sum.dtype)
                acc.channel.merge(st.channel)
            if st.absmax is not None:
                if acc.absmax is None:
                    acc.absmax = ChannelMax(st.absmax.in_features, st.absmax.signed.device)
                acc.absmax.merge(st.absmax)
    return out


@dataclass
class SolveTask:
    """Quantize `linears` of an input group on one worker.

    kind: 'rtn', 'gptq' (Hessian of the group's inputs), 'awq' (scaled weights, RTN after an
    optional clip search on `clip_rows`) or 'awq+gptq' (scaled weights, scaled Hessian).
    `rows` (GPTQ kinds, one linear): solve only the output rows [start, end) of it; the
    worker still reduces and factorizes the group's whole Hessian (`RowSlice`).
    `fused`: every quantized linear of the group (kept when a task is split per linear), the
    linears a server fuses into one (q/k/v, gate/up), which share NVFP4's global scale.
    """

    group: str
    linears: tuple[str, ...]
    kind: str
    clip: bool = False
    clip_skip: tuple[str, ...] = ()
    clip_rows: torch.Tensor | None = None
    rows: tuple[int, int] | None = None
    fused: tuple[str, ...] = ()


@dataclass
class RowSlice:
    """Output rows [start, end) of a linear's quantized weight: the result of a row-split task."""

    start: int
    end: int
    weight: QuantizedWeight


def join_row_slices(name: str, slices: Iterable[RowSlice], out_features: int) -> QuantizedWeight:
    """A linear's quantized weight from its row slices (any order; `concat_rows` in row order).
    The slices must cover rows [0, out_features) exactly once."""
    ordered = sorted(slices, key=lambda r: r.start)
    edge = 0
    for r in ordered:
        if r.start != edge:
            raise ValueError(f"{name}: row slices leave a gap or overlap at row {min(edge, r.start)}")
        edge = r.end
    if edge != out_features:
        raise ValueError(f"{name}: row slices cover rows [0, {edge}) of {out_features}")
    return concat_rows([r.weight for r in ordered])


class BlockSteps(Protocol):
    """What `calibrate_block` needs from an executor (local or Ray): each step runs on every
    worker, or on the worker that owns the task, and comes back reduced."""

    def observe(
        self, groups: list[tuple[str, str]], *, channel: bool, capture: dict[str, str | None]
    ) -> dict[str, torch.Tensor]:
        """Every group gets a Hessian (GPTQ's solve; AWQ: the exact errors of linear
        consumers and the reported losses); `channel`: AWQ's mean |x| too."""
        ...

    def awq_losses(
        self, group: str, linears: tuple[str, ...], quantized: tuple[str, ...], consumer: str, x_mean: torch.Tensor
    ) -> list[float]: ...

    def fold(self, group: str, choice: int | None, prev: str, linears: tuple[str, ...]) -> None: ...

    def sample_rows(self, group: str, n: int) -> torch.Tensor: ...

    def solve(self, tasks: list[SolveTask]) -> dict[str, float]: ...

    def apply(self) -> None: ...

    def end_group(self, group: str) -> None: ...

    def input_extremes(self) -> dict[str, torch.Tensor]:
        """The last observation pass's `ChannelMax.signed` (max x, max -x per input channel) of
        each group, reduced by max over workers (passes observe it when `observes_inputs`)."""
        ...

    def calibrate_inputs(
        self, plan: dict[str, tuple[torch.Tensor | None, str, tuple[str, ...], tuple[str, ...], bool]]
    ) -> None:
        """On every worker, for each group (absmax, prev, linears, quantized, smooth): fold the
        SmoothQuant scales if `smooth`, and set the quantized linears' static input parameters."""
        ...

    def expert_tokens(self) -> dict[str, Any]:
        """The last observation pass's routing: {"routed": tokens routed to each expert,
        "rows": tokens seen}, summed over workers (empty for a dense block)."""
        ...


def experts_per_pass(q: QuantConfig) -> int | None:
    """Routed experts observed (and solved) per pass: `quant.moe_experts_per_pass` once chosen
    (`tools.fit.choose`), None (all at once) while it is still `auto`."""
    v = q.moe_experts_per_pass
    return None if v == "auto" else int(v)


def block_work(
    groups: Iterable[InputGroup], block_name: str, q: QuantConfig
) -> list[tuple[InputGroup, tuple[str, ...]]]:
    """(input group, its linears that get quantized) for every group (of a block: see
    `Adapter.block_groups`) with something to quantize."""
    work = []
    for g in groups:
        quantized = tuple(n for n in g.linears if not is_ignored(f"{block_name}.{n}", q.ignore))
        if quantized:
            work.append((g, quantized))
    return work


def calibrate_block(
    ex: BlockSteps, block_name: str, shapes: nn.Module, adapter: Adapter, q: QuantConfig, profile: BlockProfile
) -> dict[str, float]:
    """Quantize one loaded block through the executor's steps; return each linear's loss.

    With true-sequential order each input group is observed after the earlier groups were
    quantized, so later layers correct for the error of earlier ones (GPTQ paper); linears
    that share an input share one Hessian. AWQ goes group by group: search the scales on the
    consumer's output (losses summed over workers), fold them, then quantize the scaled
    weights (RTN with a clip search, or GPTQ with the Hessian of the scaled inputs).
    `shapes` is the block on the meta device (shapes only), for the checks the driver makes.
    """
    if q.method == "none":
        return {}
    work = block_work(adapter.block_groups(num_experts(shapes, adapter)), block_name, q)
    calibrating_inputs = observes_inputs(q)
    if q.method == "rtn" and not calibrating_inputs:
        losses = ex.solve([SolveTask(g.name, quantized, "rtn", fused=quantized) for g, quantized in work])
        ex.apply()
        return losses
    use_awq = q.method in AWQ_METHODS
    losses: dict[str, float] = {}
    shared: set[str] = set()  # groups whose input took a scale group's scale (`Adapter.scale_groups`)
    scale_only = adapter.scale_groups(num_experts(shapes, adapter)) if use_awq else ()
    work = _with_scale_groups(work, scale_only)
    for phase in phases(work, lambda w: w[0], q.true_sequential, experts_per_pass(q)):
        means = ex.observe(
            [(g.name, g.linears[0]) for g, _ in phase],
            channel=use_awq,
            capture={g.name: g.consumer for g, _ in phase} if use_awq else {},
        )
        fallback = _expert_fallbacks(ex, phase, block_name, q, profile)
        if calibrating_inputs:
            _calibrate_inputs(ex, shapes, phase, block_name, q, profile)
        if not use_awq:
            losses.update(ex.solve([
                SolveTask(g.name, quantized, "rtn" if g.name in fallback else q.method, fused=quantized)
                for g, quantized in phase
            ]))
            ex.apply()
            continue
        for g, quantized in phase:
            if any(g is sg for sg in scale_only):  # scales only: its linears solve in their own groups
                shared |= _search_and_fold(ex, g, quantized, shapes, means, block_name, q, profile, phase)
                ex.end_group(g.name)
                continue
            if g.name in fallback:  # too few tokens to search scales on: plain RTN
                losses.update(ex.solve([SolveTask(g.name, quantized, "rtn", fused=quantized)]))
                ex.apply()
                ex.end_group(g.name)
                continue
            if g.name not in shared:
                _search_and_fold(ex, g, quantized, shapes, means, block_name, q, profile, phase)
            task = SolveTask(g.name, quantized, q.method, clip=q.awq_clip, clip_skip=tuple(g.clip_skip))
            if q.method == "awq" and q.awq_clip:
                task.clip_rows = ex.sample_rows(g.name, q.awq_clip_tokens)
            losses.update(ex.solve([task]))
            ex.apply()
            ex.end_group(g.name)
    return losses


def _with_scale_groups(
    work: list[tuple[InputGroup, tuple[str, ...]]], scale_groups: Iterable[InputGroup]
) -> list[tuple[InputGroup, tuple[str, ...]]]:
    """`work` with each scale-only group placed before the first group of its phase (it is
    observed in the same pass), paired with its linears that get quantized."""
    out = list(work)
    for sg in scale_groups:
        quantized = tuple(n for n in sg.linears if n in {m for _, qs in work for m in qs})
        at = next((i for i, (g, _) in enumerate(out) if g.phase == sg.phase), None)
        if quantized and at is not None:
            out.insert(at, (sg, quantized))
    return out


def _search_and_fold(
    ex: BlockSteps, g: InputGroup, quantized: tuple[str, ...], shapes: nn.Module, means: dict[str, torch.Tensor],
    block_name: str, q: QuantConfig, profile: BlockProfile, phase: list[tuple[InputGroup, tuple[str, ...]]],
) -> set[str]:
    """AWQ's scale search for group `g` and its fold (a note when the group cannot take
    scales); returns the groups of `phase` whose every linear took the scale (for a scale-only
    group: the experts' and the shared expert's gate/up), empty when nothing was folded."""
    blocker = scale_blocker(shapes, g)
    if blocker is None and g.name not in means:
        blocker = f"{g.name}: no calibration token reached it"
    if blocker is not None:
        profile.notes.append(f"{block_name}: AWQ scales skipped for {blocker}")
        return set()
    found = awq.choose_index(ex.awq_losses(g.name, g.linears, quantized, g.consumer, means[g.name]))
    ratio = None if found.index == 0 else (found.index - 1) / q.awq_grid
    profile.awq[g.name] = {"ratio": ratio, "loss": found.loss, "identity_loss": found.identity_loss}
    ex.fold(g.name, found.index or None, g.prev, g.linears)
    folded = set(g.linears)
    return {m.name for m, _ in phase if m.name != g.name and m.prev == g.prev and set(m.linears) <= folded}


def observes_inputs(q: QuantConfig) -> bool:
    """Whether the observation passes also take each input's `ChannelMax`: for static input
    parameters (FP8 static, NVFP4's global scale) or SmoothQuant's scales."""
    return q.smoothquant is not None or q.static_inputs


def smooth_blocker(block: nn.Module, group: InputGroup) -> str | None:
    """Why `group` takes no SmoothQuant scales, or None when it does: the op before it must be
    a norm that absorbs them (`scale_blocker`'s conditions; a previous linear is left alone,
    as llm-compressor's default mappings do, so no quantized weight is rounded twice)."""
    if group.no_scale:
        return f"{group.name}: {group.no_scale}"
    if isinstance(block.get_submodule(group.prev), nn.Linear):
        return f"{group.name}: its input comes from the linear {group.prev}, not a norm"
    return scale_blocker(block, group, need_consumer=False)


def _calibrate_inputs(
    ex: BlockSteps, shapes: nn.Module, phase: list[tuple[InputGroup, tuple[str, ...]]], block_name: str,
    q: QuantConfig, profile: BlockProfile,
) -> None:
    """After an observation pass: every worker folds SmoothQuant's scales (when on) and sets
    the static input parameters of the phase's linears, from each input's `ChannelMax`
    reduced over the workers (max: exact)."""
    extremes = ex.input_extremes()
    plan: dict[str, tuple[torch.Tensor | None, str, tuple[str, ...], tuple[str, ...], bool]] = {}
    for g, quantized in phase:
        smooth = False
        if q.smoothquant is not None:
            blocker = smooth_blocker(shapes, g)
            if blocker is not None:
                profile.notes.append(f"{block_name}: SmoothQuant skipped for {blocker}")
            smooth = blocker is None
        plan[g.name] = (extremes.get(g.name), g.prev, tuple(g.linears), quantized, smooth)
    ex.calibrate_inputs(plan)


def _expert_fallbacks(
    ex: BlockSteps, phase: list[tuple[InputGroup, tuple[str, ...]]], block_name: str, q: QuantConfig,
    profile: BlockProfile,
) -> set[str]:
    """After a pass that observed experts: record each expert's routed tokens on `profile`
    and return the expert groups whose statistics hold fewer than `quant.moe_min_tokens`
    tokens (they are quantized by RTN instead; the note says which)."""
    experts = {g.name: g.expert for g, _ in phase if g.expert is not None}
    if not experts:
        return set()
    got = ex.expert_tokens()
    routed, rows = [int(t) for t in got["routed"]], int(got["rows"])
    seen = [rows] * len(routed) if q.moe_calibrate_all_experts else routed
    low = {name for name, e in experts.items() if seen[e] < q.moe_min_tokens}
    rec = profile.experts
    rec["passes"] = rec.get("passes", 0) + 1  # observation passes over experts (`quant.moe_experts_per_pass`)
    rec["tokens"], rec["rows"] = routed, rows
    rec["statistics_tokens"] = seen
    rec.setdefault("rtn_fallback", [])
    new = sorted({experts[n] for n in low} - set(rec["rtn_fallback"]))
    if new:
        rec["rtn_fallback"] = sorted({*rec["rtn_fallback"], *new})
        profile.notes.append(
            f"{block_name}: experts {new} saw fewer than quant.moe_min_tokens={q.moe_min_tokens} tokens; "
            "quantized by RTN instead"
        )
    return low
