"""The per-method solvers of one block (calib.solvers), without workers, Ray or files."""

from __future__ import annotations

import pytest
import torch

from shardquant.algorithms import awq
from shardquant.algorithms.gptq import GPTQSolver
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.rtn import quantize_rtn
from shardquant.calib.solvers import SOLVERS, solve_task
from shardquant.calib.steps import GroupStats, SolveTask, quant_spec
from shardquant.config import GPTQ_METHODS, QuantConfig


def _problem(dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(400, 64, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 4, 64, dtype=torch.float64)
    block = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 48, bias=False), "b": torch.nn.Linear(64, 24, bias=False)})
    with torch.no_grad():
        for lin in block.values():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.1)
    block.requires_grad_(False)
    s = torch.exp(0.5 * torch.randn(64, generator=gen))
    return x, block, s


def test_every_method_has_a_solver():
    assert set(SOLVERS) == {"rtn", "gptq", "awq", "awq+gptq"} and set(GPTQ_METHODS) <= set(SOLVERS)


def test_rtn_solver_is_round_to_nearest_of_the_current_weight():
    _, block, _ = _problem()
    q = QuantConfig(method="rtn", bits=4, group_size=32)
    spec = quant_spec(q)
    weights, losses = solve_task(SolveTask("g", ("a", "b"), "rtn"), block, {}, scales={}, originals={},
                                 spec=spec, q=q)
    assert list(weights) == list(losses) == ["a", "b"]
    for n in ("a", "b"):
        w = block[n].weight.detach()
        want = quantize_rtn(w, spec)
        assert torch.equal(weights[n].codes, want.codes) and torch.equal(weights[n].scales, want.scales)
        assert losses[n] == pytest.approx(float((w - want.dequantize()).pow(2).sum()), rel=1e-6)


def test_awq_gptq_solver_quantizes_the_scaled_weights_with_the_scaled_inputs_hessian():
    """awq+gptq from the Hessian of x and scales s equals GPTQ on W * s with the Hessian
    accumulated from x / s directly (float64: the two Hessians agree to rounding)."""
    x, block, s = _problem()
    q = QuantConfig(method="awq+gptq", bits=4, group_size=32, act_order=True)
    spec = quant_spec(q)
    hx, hs = HessianAccumulator(64, dtype=torch.float64), HessianAccumulator(64, dtype=torch.float64)
    hx.add(x)
    hs.add(x / s.double())
    originals = {n: block[n].weight.detach().float().clone() for n in ("a", "b")}
    weights, losses = solve_task(SolveTask("g", ("a", "b"), "awq+gptq"), block, {"g": GroupStats(hx)},
                                 scales={"g": s}, originals=originals, spec=spec, q=q)
    solver = GPTQSolver(hs.hessian(), damp=q.damp, act_order=True, reorder=q.reorder, group_size=32)
    want = solver.quantize_many([originals["a"] * s, originals["b"] * s], spec, block_size=q.block_size,
                                static_groups=q.static_groups, group_range=q.group_range)
    for n, ref in zip(("a", "b"), want, strict=True):
        same = (weights[n].codes == ref.weight.codes).float().mean()
        assert same > 0.99, n
        torch.testing.assert_close(weights[n].dequantize(), ref.weight.dequantize(), rtol=0, atol=0.05)
        assert losses[n] == pytest.approx(float(ref.loss), rel=1e-3)


def test_awq_solver_loss_is_the_unscaled_inputs_output_error_per_row():
    """awq: RTN of W * s (clip search on the rows given), loss = ||x (W - Q(W s) / s)^T||^2 / rows."""
    x, block, s = _problem()
    q = QuantConfig(method="awq", bits=3, group_size=32)
    spec = quant_spec(q)
    acc = HessianAccumulator(64)
    acc.add(x.float())
    originals = {n: block[n].weight.detach().float().clone() for n in ("a", "b")}
    rows = (x[::7] / s.double()).float()
    task = SolveTask("g", ("a", "b"), "awq", clip=True, clip_skip=("b",), clip_rows=rows)
    weights, losses = solve_task(task, block, {"g": GroupStats(acc)}, scales={"g": s}, originals=originals,
                                 spec=spec, q=q)
    for n in ("a", "b"):
        ws = originals[n] * s
        target = ws
        if n == "a":
            found = awq.search_clip(ws, rows, spec, grid=q.awq_clip_grid, max_shrink=q.awq_clip_max_shrink)
            target = awq.apply_clip(ws, spec, found.ratio)
        want = quantize_rtn(target, spec)
        assert torch.equal(weights[n].codes, want.codes) and torch.equal(weights[n].scales, want.scales)
        effective = want.dequantize().double() / s.double()
        direct = float((x @ (originals[n].double() - effective).T).pow(2).sum()) / len(x)
        assert losses[n] == pytest.approx(direct, rel=1e-3)
    # the clip search changed something for "a" (and "b" was skipped: plain RTN of W * s)
    assert not torch.equal(weights["a"].codes, quantize_rtn(originals["a"] * s, spec).codes)
