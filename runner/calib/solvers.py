"""One solver per method: a `SolveTask`'s linears of a block to quantized weights and losses.

Every solver has the signature of `Solver`: the task, the block (its linears hold the
current weights), the task group's merged statistics, the group's AWQ scales (None when
unscaled), the float32 weights from before the scaling (`originals`), the scheme and the
quantization config. Nothing here changes the block: the caller sets the dequantized
weights (`BlockWorker.apply`) on every worker.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from shardquant.algorithms import awq
from shardquant.algorithms.floatq import (
    FloatQuantizedWeight,
    FloatSpec,
    global_scale,
    quantize_float_rtn,
)
from shardquant.algorithms.gptq import GPTQSolver
from shardquant.algorithms.quantizer import MSEGrid, QuantizedWeight, QuantSpec, concat_rows
from shardquant.algorithms.rtn import quantize_rtn
from shardquant.calib.steps import GroupStats, SolveTask
from shardquant.config import GPTQ_METHODS, QuantConfig

Solved = tuple[dict[str, QuantizedWeight | FloatQuantizedWeight], dict[str, float]]
Spec = QuantSpec | FloatSpec
Solver = Callable[
    [SolveTask, nn.Module, GroupStats | None, Tensor | None, dict[str, Tensor], Spec, QuantConfig],
    Solved,
]


def mse_grid(q: QuantConfig) -> MSEGrid | None:
    """The MSE range search of `quant.mse*`, or None (plain min/max ranges)."""
    return MSEGrid(grid=q.mse_grid, max_shrink=q.mse_max_shrink, norm=q.mse_norm) if q.mse else None


def fused_global_scale(task: SolveTask, block: nn.Module, spec: Spec) -> Tensor | None:
    """NVFP4: one global scale for all the group's linears (`task.fused`, which a server such as
    vLLM fuses into one matmul with one global scale), from their weights as they are now (no
    group member is applied before all are solved); None for other specs."""
    if not isinstance(spec, FloatSpec) or not spec.has_global:
        return None
    names = task.fused or task.linears
    amax = max(block.get_submodule(n).weight.detach().float().abs().amax() for n in names)
    return global_scale(amax.reshape(1))


def task_weight(block: nn.Module, name: str, s: Tensor | None, originals: dict[str, Tensor]) -> Tensor:
    """The float32 weight to quantize: the original times the group's scales, if any."""
    if s is not None and name in originals:
        return originals[name].float() * s
    return block.get_submodule(name).weight.float()


def squared_error_(a: Tensor, b: Tensor) -> float:
    """Sum of the squared differences of two float32 tensors, computed in ``a``'s buffer,
    which it overwrites: one in-place difference and one dot product, and no new tensor to
    be page-faulted in on CPU."""
    d = a.sub_(b).view(-1)
    return float(torch.dot(d, d))


def solve_rtn(
    task: SolveTask, block: nn.Module, stats: GroupStats | None, s: Tensor | None,
    originals: dict[str, Tensor], spec: Spec, q: QuantConfig,
) -> Solved:
    """Round to nearest, each linear on its own (through the integer or float quantizer of
    `spec`); the loss is the weight's squared error."""
    mse = mse_grid(q)
    gscale = fused_global_scale(task, block, spec)
    weights: dict[str, QuantizedWeight | FloatQuantizedWeight] = {}
    losses: dict[str, float] = {}
    for name in task.linears:
        w = block.get_submodule(name).weight.float()
        if isinstance(spec, FloatSpec):
            qw = quantize_float_rtn(w, spec, gscale)
        else:
            qw = quantize_rtn(w, spec, mse=mse)
        weights[name] = qw
        losses[name] = squared_error_(qw.dequantize().to(w.device), w)
    return weights, losses


def solve_gptq(
    task: SolveTask, block: nn.Module, stats: GroupStats | None, s: Tensor | None,
    originals: dict[str, Tensor], spec: Spec, q: QuantConfig,
) -> Solved:
    """GPTQ with one factorization of the group's Hessian for all its linears; with AWQ scales
    (`awq+gptq`) the scaled weights and the Hessian of the scaled inputs.

    The factorization is built in the statistics' own buffer (they are spent: see
    `factorize`) and kept on `stats`, so the group's other tasks on this worker reuse it.
    A row-split task (`task.rows`) quantizes only those rows of its one linear: the weight
    and loss of that slice, under the linear's name."""
    solver = factorize(stats, s, q)
    gscale = fused_global_scale(task, block, spec)
    ws = [task_weight(block, name, s, originals) for name in task.linears]
    if task.rows is not None:
        if len(ws) != 1:
            raise ValueError(f"a row-split task has one linear, got {task.linears}")
        start, end = task.rows
        ws = [ws[0][start:end]]
    solved = solver.quantize_many(ws, spec, block_size=q.block_size, static_groups=q.static_groups,
                                  mse=mse_grid(q), group_range=q.group_range,
                                  global_scales=None if gscale is None else [gscale] * len(ws))
    weights: dict[str, QuantizedWeight | FloatQuantizedWeight] = {}
    losses: dict[str, float] = {}
    for name, res in zip(task.linears, solved, strict=True):
        weights[name], losses[name] = res.weight, float(res.loss)
    return weights, losses


def factorize(stats: GroupStats, s: Tensor | None, q: QuantConfig) -> GPTQSolver:
    """The group's `GPTQSolver`, built once: H is formed in the accumulator's buffer (scaled
    there for `awq+gptq`) and factorized in it, so the solve holds one in×in matrix beyond the
    statistics; the accumulator is spent and the solver is cached on `stats.solver`."""
    if stats.solver is None:
        H = stats.hessian.hessian(consume=True)
        if s is not None:
            H = awq.scaled_hessian(H, s, inplace=True)
        stats.solver = GPTQSolver(H, damp=q.damp, act_order=q.act_order, reorder=q.reorder,
                                  group_size=q.group_size, overwrite_h=True)
        stats.hessian = None
    return stats.solver


def solve_awq(
    task: SolveTask, block: nn.Module, stats: GroupStats | None, s: Tensor | None,
    originals: dict[str, Tensor], spec: Spec, q: QuantConfig,
) -> Solved:
    """RTN on the scaled weights, after a clip search on the task's sampled rows; the loss is
    the output error seen by the unscaled inputs (through the Gram matrix), per row."""
    clip_x = task.clip_rows
    acc = stats.hessian
    gram = acc.gram()
    weights: dict[str, QuantizedWeight] = {}
    losses: dict[str, float] = {}
    for name in task.linears:
        scaled = s is not None and name in originals
        source = originals[name] if scaled else block.get_submodule(name).weight
        clip = task.clip and name not in task.clip_skip and clip_x is not None
        parts, loss = [], 0.0
        for r in awq.row_chunks(*source.shape):  # a chunk of rows at a time: no whole-weight copies
            w = source[r].float() * s if scaled else source[r].float()
            target = w
            if clip:
                found = awq.search_clip(
                    w, clip_x.to(w.device), spec, grid=q.awq_clip_grid, max_shrink=q.awq_clip_max_shrink
                )
                target = awq.apply_clip(w, spec, found.ratio)
            qw = quantize_rtn(target, spec)
            parts.append(qw)
            delta = w - qw.dequantize().to(w.device)
            if s is not None:
                delta = delta / s.to(delta.device)  # the error seen by the unscaled inputs
            loss += awq.linear_output_error(delta, gram)
        weights[name] = concat_rows(parts) if len(parts) > 1 else parts[0]
        losses[name] = loss / acc.count
    return weights, losses


SOLVERS: dict[str, Solver] = {"rtn": solve_rtn, "awq": solve_awq, **dict.fromkeys(GPTQ_METHODS, solve_gptq)}


def solve_task(
    task: SolveTask,
    block: nn.Module,
    stats: dict[str, GroupStats],
    *,
    scales: dict[str, Tensor],
    originals: dict[str, Tensor],
    spec: Spec,
    q: QuantConfig,
) -> Solved:
    """The solver of `task.kind` on the task, with its group's statistics and scales."""
    if task.rows is not None and task.kind not in GPTQ_METHODS:
        raise ValueError(f"only GPTQ solves can be row-split, not '{task.kind}' ({task.linears})")
    if task.rows is not None and isinstance(spec, FloatSpec):  # NVFP4's global scale and fp8 blocks span rows
        raise ValueError(f"float formats are not row-split ({task.linears})")
    return SOLVERS[task.kind](task, block, stats.get(task.group), scales.get(task.group), originals, spec, q)
