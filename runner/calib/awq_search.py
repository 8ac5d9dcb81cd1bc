"""AWQ's scale search on one block: each candidate scale's consumer error, and the clip rows.

A worker measures, on its share of the samples, the summed squared error of a group's
consumer for every candidate scale (`search_losses`); the driver sums the workers' totals
and picks one (`awq.choose_index`). A consumer that is a linear of the group is measured
exactly on every row through the group's Gram matrix (`linear_losses`); any other consumer
(attention, MLP) is run on a few whole windows cut from the captured calls (`sample_calls`,
`module_losses`), the same windows however the samples are split over workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shardquant.algorithms import awq
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import QuantSpec
from shardquant.calib.observe import Capture
from shardquant.calib.steps import _first
from shardquant.config import QuantConfig


def _take_windows(obj: Any, rows: Tensor, batch: int) -> Any:
    """``obj`` (a call's args or kwargs, nested) with every tensor whose leading dim is the
    batch cut to the windows ``rows``; batch-free tensors (rotary tables, a [1, T] position
    row) are left whole."""
    if isinstance(obj, Tensor):
        return obj[rows.to(obj.device)] if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_take_windows(o, rows, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _take_windows(v, rows, batch) for k, v in obj.items()}
    return obj


def sample_calls(
    cap: Capture, n: int | None, offset: int = 0, total: int | None = None
) -> list[tuple[tuple, dict]]:
    """The captured consumer calls cut to ``n`` whole windows evenly spaced over all workers'
    windows (this worker's are [offset, offset + own) of ``total``; None: this worker alone);
    every call when ``n`` is None or covers them all."""
    sizes = [x.shape[0] for x in cap.inputs]
    own = sum(sizes)
    total = own if total is None else total
    if n is None or n >= total or len(sizes) != len(cap.calls):
        return list(cap.calls)
    idx = awq.even_indices(total, n)
    idx = idx[(idx >= offset) & (idx < offset + own)] - offset
    out, start = [], 0
    for (args, kwargs), b in zip(cap.calls, sizes, strict=True):
        mine = idx[(idx >= start) & (idx < start + b)] - start
        start += b
        if len(mine) == b:
            out.append((args, kwargs))
        elif len(mine):
            out.append((_take_windows(args, mine, b), _take_windows(kwargs, mine, b)))
    return out


def linear_losses(
    hessian: HessianAccumulator, weights: list[Tensor], candidates: list[Tensor], spec: QuantSpec
) -> tuple[list[float], int]:
    """Summed output error of linears sharing the input, for each candidate, exactly, through
    the input's Gram matrix; and the element count (rows times outputs)."""
    gram = hessian.gram()
    totals = [sum(awq.scaled_quantization_error(w, s, spec, gram) for w in weights) for s in candidates]
    return totals, hessian.count * sum(w.shape[0] for w in weights)


def module_losses(
    module: nn.Module,
    lins: dict[str, nn.Linear],
    quantized: tuple[str, ...],
    originals: dict[str, Tensor],
    candidates: list[Tensor],
    calls: list[tuple[tuple, dict]],
    spec: QuantSpec,
) -> tuple[list[float], int]:
    """Summed squared error of `module`'s output over `calls` for each candidate: the
    `quantized` linears set to ``Q(W * s) / s``, the others of `lins` to their `originals`;
    and the element count. The weights of `lins` are `originals` again afterwards."""
    with torch.no_grad():
        refs = [_first(module(*a, **kw)) for a, kw in calls]
    totals, count = [], 0
    try:
        with torch.no_grad():
            for s in candidates:
                for n, lin in lins.items():
                    if n not in quantized:
                        lin.weight.copy_(originals[n])
                        continue
                    for r in awq.row_chunks(*lin.weight.shape):  # no whole-weight temporaries
                        lin.weight[r].copy_(awq.scaled_fake_quantize(originals[n][r], s, spec))
                total, count = 0.0, 0
                for (a, kw), ref in zip(calls, refs, strict=True):
                    y = _first(module(*a, **kw))
                    total += float((y.float() - ref.float()).pow(2).sum())
                    count += y.numel()
                totals.append(total)
    finally:
        with torch.no_grad():
            for n, lin in lins.items():
                lin.weight.copy_(originals[n])
    return totals, count


@dataclass
class SearchLosses:
    """One worker's part of a scale search: the candidates (`awq.candidate_scales` order),
    each one's summed consumer error and the element count, and copies (compute dtype) of the
    quantized linears' weights before any scaling (what the solve scales)."""

    candidates: list[Tensor]
    totals: list[float]
    count: int
    originals: dict[str, Tensor]


def search_losses(
    block: nn.Module,
    cap: Capture,
    linears: tuple[str, ...],
    quantized: tuple[str, ...],
    consumer: str,
    x_mean: Tensor,
    q: QuantConfig,
    spec: QuantSpec,
    offset: int = 0,
    total: int | None = None,
) -> SearchLosses:
    """Every candidate scale's error for the group `linears` (`quantized` of them) of `block`.

    A consumer that is one of the quantized linears (or, with `quant.awq_search_objective:
    linears`, the quantized linears in place of any consumer) is measured exactly on every
    captured row through the group's Gram matrix; any other (attention, MLP) is run on
    `quant.awq_search_samples` whole windows evenly spaced over all workers' windows (this
    worker's are [offset, offset + own) of `total`). The block's weights are left as found.
    """
    lins = {n: block.get_submodule(n) for n in linears}
    originals = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    kept = {n: originals[n] for n in quantized}  # in the compute dtype: exact, half of fp32 in bf16
    w_mean = awq.weight_mean([originals[n] for n in quantized], spec) if q.awq_duo_scaling else None
    candidates = awq.candidate_scales(
        x_mean.to(originals[quantized[0]].device), grid=q.awq_grid, w_mean=w_mean
    )
    if q.awq_search_objective == "linears" and cap.hessian is not None:
        totals, count = linear_losses(cap.hessian, [originals[n] for n in quantized], candidates, spec)
    elif consumer in quantized and cap.hessian is not None:
        totals, count = linear_losses(cap.hessian, [originals[consumer]], candidates, spec)
    else:
        calls = sample_calls(cap, q.awq_search_samples, offset, total)
        totals, count = module_losses(
            block.get_submodule(consumer), lins, quantized, originals, candidates, calls, spec
        )
    return SearchLosses(candidates, totals, count, kept)


def sample_rows(
    inputs: list[Tensor], n: int, offset: int = 0, total: int | None = None, scales: Tensor | None = None
) -> Tensor:
    """This worker's part of n rows evenly spaced over all workers' captured `inputs` of a
    group (its rows are [offset, offset + own) of `total`; None: this worker alone), divided
    by the group's `scales` when it was scaled: the clip search's sample of the scaled inputs."""
    if total is None:
        rows = awq.subsample_rows(inputs, n)
    else:
        idx = awq.even_indices(total, n)
        own = sum(x.reshape(-1, x.shape[-1]).shape[0] for x in inputs)
        rows = awq.take_rows(inputs, idx[(idx >= offset) & (idx < offset + own)] - offset)
    return rows if scales is None else rows / scales.to(rows.device)
