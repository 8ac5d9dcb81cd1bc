"""GPTQ against a textbook column-by-column implementation written out here."""

from __future__ import annotations

import pytest
import torch

from shardquant.algorithms.gptq import GPTQSolver, gptq_quantize
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import QuantSpec
from shardquant.algorithms.rtn import quantize_rtn

OUT, IN = 48, 128


def gar_order(diag: torch.Tensor, glen: int) -> torch.Tensor:
    """Group-aware order with Python sorts: groups of consecutive columns by decreasing largest
    diagonal entry, columns of a group by decreasing diagonal; ties keep column order."""
    d = diag.tolist()
    groups = [list(range(g, min(g + glen, len(d)))) for g in range(0, len(d), glen)]
    ranked = sorted(range(len(groups)), key=lambda k: -max(d[j] for j in groups[k]))
    return torch.tensor([j for k in ranked for j in sorted(groups[k], key=lambda j: -d[j])])


def textbook_gptq(W, H, *, bits, group, sym, act_order, static_groups, damp=0.01, reorder="none",
                  block_start=None):
    """Plain GPTQ in float64: quantize one column, push its error onto all later columns.

    ``reorder="group"``: process in ``gar_order``; a group keeps its original columns and gets
    its qparams when its first column is reached. ``block_start=B``: those qparams come from
    a copy of the weights taken every B columns (processing order) instead of the current ones."""
    W, H = W.double().clone(), H.double().clone()
    n, maxq = W.shape[1], 2**bits - 1
    dead = [j for j in range(n) if H[j, j] == 0]
    for j in dead:
        H[j, j] = 1.0
        W[:, j] = 0.0

    def qparams(x):
        lo = x.min(dim=1).values.clamp(max=0)
        hi = x.max(dim=1).values.clamp(min=0)
        span = 2 * torch.maximum(-lo, hi) if sym else hi - lo
        s = torch.where(span > 0, span / maxq, torch.ones_like(span))
        s = s.clamp(min=torch.finfo(torch.float16).tiny).half().double()
        z = torch.full_like(s, 2 ** (bits - 1)) if sym else torch.round(-lo / s).clamp(0, maxq)
        return s, z

    glen = n if group == -1 else group
    n_groups = -(-n // glen)
    if group == -1 or static_groups:  # fixed up front from the original columns
        fixed = [qparams(W[:, g * glen : (g + 1) * glen]) for g in range(n_groups)]
        scales = torch.stack([s for s, _ in fixed], 1)
        zeros = torch.stack([z for _, z in fixed], 1)
    else:
        scales = torch.zeros(W.shape[0], n_groups, dtype=torch.float64)
        zeros = torch.zeros_like(scales)

    if reorder == "group":
        perm = gar_order(H.diag(), glen)
    elif act_order:
        perm = torch.argsort(H.diag(), descending=True, stable=True)
    else:
        perm = torch.arange(n)
    H, W = H[perm][:, perm], W[:, perm]
    H += damp * H.diag().mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)

    codes = torch.zeros(W.shape[0], n, dtype=torch.int64)
    g_idx = torch.zeros(n, dtype=torch.int64)
    loss = 0.0
    snap = W
    for i in range(n):
        if block_start is not None and i % block_start == 0:
            snap = W.clone()
        src = W if block_start is None else snap
        orig = int(perm[i])
        if group == -1 or static_groups:
            g = orig // glen
        elif reorder == "group":
            g = orig // glen
            if i == 0 or int(perm[i - 1]) // glen != g:
                size = min(glen, n - g * glen)
                scales[:, g], zeros[:, g] = qparams(src[:, i : i + size])
        else:
            g = i // glen
            if i % glen == 0:
                scales[:, g], zeros[:, g] = qparams(src[:, i : i + glen])
        s, z = scales[:, g], zeros[:, g]
        code = torch.clamp(torch.round(W[:, i] / s) + z, 0, maxq)
        err = (W[:, i] - (code - z) * s) / U[i, i]
        loss += float((err**2).sum()) / 2
        W[:, i + 1 :] -= torch.outer(err, U[i, i + 1 :])
        codes[:, orig] = code.long()
        g_idx[orig] = g
    return codes, scales, zeros.long(), g_idx, loss


def correlated_inputs(n_rows: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Activations with strongly correlated channels and a few large outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=gen, dtype=torch.float64) / IN**0.5
    mix += torch.eye(IN, dtype=torch.float64) * 0.3
    x = torch.randn(n_rows, IN, generator=gen, dtype=torch.float64) @ mix
    x[:, [7, 40, 99]] *= 8.0
    return x.to(dtype)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1], dtype=x.dtype)
    acc.add(x)
    return acc.hessian()


CASES = [
    (sym, group, act, static)
    for sym in (True, False)
    for group in (32, -1)
    for act in (False, True)
    for static in (False, True)
    if not (static and group == -1)
]


@pytest.mark.parametrize("block_size", [32, 20])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("sym", "group", "act_order", "static"), CASES)
def test_matches_textbook_gptq(block_size, bits, sym, group, act_order, static) -> None:
    x = correlated_inputs(512, torch.float64)
    x[:, 5] = 0  # one dead channel
    H = hessian_of(x)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
    got = gptq_quantize(
        W, H, spec, block_size=block_size, act_order=act_order, static_groups=static
    )
    codes, scales, zeros, g_idx, loss = textbook_gptq(
        W, H, bits=bits, group=group, sym=sym, act_order=act_order, static_groups=static
    )
    qw = got.weight
    assert qw.codes.dtype == torch.uint8 and qw.zeros.dtype == torch.int32
    assert qw.g_idx.dtype == torch.int32 and qw.scales.dtype == torch.float32
    assert torch.equal(qw.codes.long(), codes)
    assert torch.equal(qw.scales.double(), scales)
    assert torch.equal(qw.zeros.long(), zeros)
    assert torch.equal(qw.g_idx.long(), g_idx)
    assert got.loss == pytest.approx(loss, rel=1e-9)
    if act_order and not static and group != -1:
        assert not torch.equal(g_idx, torch.arange(IN) // group)  # the permutation shows


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((x @ w.T - x @ q.T) ** 2).sum())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_correlated_data(bits: int, act_order: bool) -> None:
    x = correlated_inputs(1024, torch.float32)
    H = hessian_of(x)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=bits, group_size=32)
    gptq = gptq_quantize(W, H, spec, act_order=act_order, block_size=32)
    rtn = quantize_rtn(W, spec)
    e_gptq = output_error(x, W, gptq.weight.dequantize())
    e_rtn = output_error(x, W, rtn.dequantize())
    assert e_gptq < 0.8 * e_rtn
    # the reported loss is tr(dW H_damped dW^T) / 2, the objective GPTQ minimizes
    dW = (W - gptq.weight.dequantize()).double()
    H_damped = H.double() + 0.01 * H.diag().mean().double() * torch.eye(IN, dtype=torch.float64)
    assert gptq.loss == pytest.approx(float((dW @ H_damped * dW).sum()) / 2, rel=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, -1])
def test_dead_columns(act_order: bool, group: int) -> None:
    x = correlated_inputs(256, torch.float32)
    x[:, [3, 64, 127]] = 0
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(3)) * 5
    res = gptq_quantize(
        W,
        hessian_of(x),
        QuantSpec(bits=4, group_size=group, symmetric=False),
        act_order=act_order,
        block_size=32,
    )
    deq = res.weight.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(res.weight.scales).all()
    assert (deq[:, [3, 64, 127]] == 0).all()
    assert res.loss == res.loss and res.loss < float("inf")


def test_solver_reuse_equals_separate_calls() -> None:
    x = correlated_inputs(256, torch.float32)
    H = hessian_of(x)
    gen = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(OUT, IN, generator=gen), torch.randn(2 * OUT, IN, generator=gen)
    spec = QuantSpec(bits=4, group_size=32)
    solver = GPTQSolver(H, act_order=True)
    shared = [solver.quantize(w, spec, block_size=32) for w in (w1, w2)]
    for w, r in zip((w1, w2), shared, strict=True):
        alone = gptq_quantize(w, H, spec, act_order=True, block_size=32)
        assert torch.equal(r.weight.codes, alone.weight.codes)
        assert torch.equal(r.weight.scales, alone.weight.scales)
        assert torch.equal(r.weight.zeros, alone.weight.zeros)
        assert torch.equal(r.weight.g_idx, alone.weight.g_idx)
        assert r.loss == alone.loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_inputs_are_not_modified(dtype: torch.dtype) -> None:
    x = correlated_inputs(256, torch.float32)
    x[:, 9] = 0
    H = hessian_of(x)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5)).to(dtype)
    W_before, H_before = W.clone(), H.clone()
    spec = QuantSpec(bits=4, group_size=32)
    res = gptq_quantize(W, H, spec, act_order=True)
    assert torch.equal(W, W_before) and torch.equal(H, H_before)
    ref = gptq_quantize(W.float(), H, spec, act_order=True)
    assert torch.equal(res.weight.codes, ref.weight.codes)


def test_damping_retries_then_fails_clearly() -> None:
    rank_one = torch.ones(IN, IN)
    solver = GPTQSolver(rank_one, damp=0.0)
    assert solver.damp > 0
    res = solver.quantize(torch.randn(4, IN), QuantSpec(bits=4, group_size=32))
    assert torch.isfinite(res.weight.dequantize()).all()
    with pytest.raises(ValueError, match="not positive definite"):
        GPTQSolver(-torch.eye(IN))
    with pytest.raises(ValueError, match="weight must be"):
        solver.quantize(torch.randn(4, IN + 1), QuantSpec())


@pytest.mark.parametrize("block_size", [32, 20, 64])
@pytest.mark.parametrize("reorder", ["none", "group"])
@pytest.mark.parametrize("sym", [True, False])
def test_block_start_ranges_match_textbook(block_size, reorder, sym) -> None:
    """group_range='block_start': each group's range from the weights as its lazy block began
    (blocks of 20 columns make groups of 32 straddle block ends)."""
    x = correlated_inputs(512, torch.float64)
    H = hessian_of(x)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spec = QuantSpec(bits=3, group_size=32, symmetric=sym)
    got = gptq_quantize(W, H, spec, block_size=block_size, reorder=reorder, group_range="block_start")
    codes, scales, zeros, _, loss = textbook_gptq(
        W, H, bits=3, group=32, sym=sym, act_order=False, static_groups=False, reorder=reorder,
        block_start=block_size,
    )
    assert torch.equal(got.weight.codes.long(), codes)
    assert torch.equal(got.weight.scales.double(), scales)
    assert torch.equal(got.weight.zeros.long(), zeros)
    assert got.loss == pytest.approx(loss, rel=1e-9)
    current = gptq_quantize(W, H, spec, block_size=block_size, reorder=reorder)
    # A block that starts where its group starts sees no earlier update within it: same ranges.
    assert torch.equal(current.weight.scales, got.weight.scales) == (block_size == 32)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("group", "static"), [(32, False), (48, False), (32, True), (-1, False)])
def test_group_reorder_matches_textbook(sym: bool, group: int, static: bool) -> None:
    x = correlated_inputs(512, torch.float64)
    x[:, 5] = 0
    H = hessian_of(x)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    spec = QuantSpec(bits=4, group_size=group, symmetric=sym)
    got = gptq_quantize(W, H, spec, block_size=20, reorder="group", static_groups=static)
    codes, scales, zeros, g_idx, loss = textbook_gptq(
        W, H, bits=4, group=group, sym=sym, act_order=False, static_groups=static, reorder="group"
    )
    qw = got.weight
    assert torch.equal(qw.codes.long(), codes)
    assert torch.equal(qw.scales.double(), scales)
    assert torch.equal(qw.zeros.long(), zeros)
    assert torch.equal(qw.g_idx.long(), g_idx)
    assert got.loss == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize("group", [32, 48])
def test_group_reorder_needs_no_g_idx(group: int) -> None:
    x = correlated_inputs(1024, torch.float32)
    H = hessian_of(x)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(7))
    spec = QuantSpec(bits=4, group_size=group, symmetric=False)
    solver = GPTQSolver(H, reorder="group", group_size=group)
    assert not torch.equal(solver.perm, torch.arange(IN))  # it does reorder
    res = solver.quantize(W, spec, block_size=32)
    qw = res.weight
    assert torch.equal(qw.g_idx, torch.arange(IN, dtype=torch.int32) // group)
    # the codes read with plain consecutive groups (no g_idx) give the solver's weights ...
    cols = torch.arange(IN) // group
    plain = (qw.codes.float() - qw.zeros[:, cols].float()) * qw.scales[:, cols]
    assert torch.equal(plain, qw.dequantize())
    # ... whose error is the loss the solver reports
    dW = (W - plain).double()
    H_damped = H.double() + 0.01 * H.diag().mean().double() * torch.eye(IN, dtype=torch.float64)
    assert res.loss == pytest.approx(float((dW @ H_damped * dW).sum()) / 2, rel=1e-4)


def test_group_reorder_order_and_errors() -> None:
    from shardquant.algorithms.gptq import group_aware_order

    diag = torch.tensor([1.0, 5.0, 2.0, 0.5, 9.0, 0.1, 3.0])
    # groups {0,1,2} max 5, {3,4,5} max 9, {6} max 3
    assert group_aware_order(diag, 3).tolist() == [4, 3, 5, 1, 2, 0, 6]
    assert torch.equal(group_aware_order(diag, 3), gar_order(diag, 3))
    H = hessian_of(correlated_inputs(256, torch.float32))
    with pytest.raises(ValueError, match="exclude each other"):
        GPTQSolver(H, act_order=True, reorder="group", group_size=32)
    with pytest.raises(ValueError, match="needs the group_size"):
        GPTQSolver(H, reorder="group")
    with pytest.raises(ValueError, match="orders groups of 32"):
        GPTQSolver(H, reorder="group", group_size=32).quantize(torch.randn(4, IN), QuantSpec(group_size=64))


@pytest.mark.parametrize("static", [False, True])
def test_quantize_many_equals_separate_calls(static: bool) -> None:
    x = correlated_inputs(256, torch.float64)
    H = hessian_of(x)
    gen = torch.Generator().manual_seed(8)
    ws = [torch.randn(o, IN, generator=gen, dtype=torch.float64) for o in (OUT, 16, 2 * OUT)]
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    solver = GPTQSolver(H, reorder="group", group_size=32)
    many = solver.quantize_many(ws, spec, block_size=32, static_groups=static)
    for w, r in zip(ws, many, strict=True):
        alone = solver.quantize(w, spec, block_size=32, static_groups=static)
        assert torch.equal(r.weight.codes, alone.weight.codes)
        assert torch.equal(r.weight.scales, alone.weight.scales)
        assert torch.equal(r.weight.zeros, alone.weight.zeros)
        assert torch.equal(r.weight.g_idx, alone.weight.g_idx)
        assert r.loss == pytest.approx(alone.loss, rel=1e-12)


@pytest.mark.parametrize("static", [False, True])
def test_mse_search_in_gptq(static: bool) -> None:
    from shardquant.algorithms.quantizer import MSEGrid

    x = correlated_inputs(1024, torch.float32)
    H = hessian_of(x)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(9))
    W[:, 3] *= 6  # outliers make shrinking worthwhile in some groups
    spec = QuantSpec(bits=3, group_size=32, symmetric=False)
    plain = gptq_quantize(W, H, spec, static_groups=static, block_size=32)
    searched = gptq_quantize(W, H, spec, static_groups=static, block_size=32, mse=MSEGrid())
    assert not torch.equal(plain.weight.scales, searched.weight.scales)
    deq = searched.weight.dequantize()
    assert torch.isfinite(deq).all()
    # the reported loss still describes the returned codes
    dW = (W - deq).double()
    H_damped = H.double() + 0.01 * H.diag().mean().double() * torch.eye(IN, dtype=torch.float64)
    assert searched.loss == pytest.approx(float((dW @ H_damped * dW).sum()) / 2, rel=1e-4)


# --- memory: the accumulator's buffer taken over, in-place factorization ------------------


@pytest.mark.parametrize("panel", [16, 50, 256])
def test_hessian_consume_builds_h_in_the_accumulator(panel: int) -> None:
    x = correlated_inputs(300, torch.float64)
    acc = HessianAccumulator(IN, dtype=torch.float64, panel=panel)
    acc.add(x[:100])
    acc.add(x[100:])
    ref = 2 * x.T @ x / 300
    copied = acc.hessian()
    torch.testing.assert_close(copied, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(copied, copied.T)
    buffer = acc.sum
    consumed = acc.hessian(consume=True)
    assert consumed.data_ptr() == buffer.data_ptr()  # no copy: the accumulator's own buffer
    assert torch.equal(consumed, copied)
    for use in (acc.hessian, acc.gram, lambda: acc.add(x), lambda: HessianAccumulator(IN).merge(acc)):
        with pytest.raises(ValueError, match="consumed"):
            use()


@pytest.mark.parametrize(("act_order", "reorder"), [(False, "none"), (True, "none"), (False, "group")])
def test_solver_from_accumulator_equals_copying_solver(act_order: bool, reorder: str) -> None:
    x = correlated_inputs(512, torch.float32)
    x[:, 11] = 0  # a dead channel
    acc = HessianAccumulator(IN, panel=48)
    acc.add(x)
    H = acc.hessian()
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(10))
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    kw = {"act_order": act_order, "reorder": reorder, "group_size": 32}
    copying = GPTQSolver(H, **kw)
    consuming = GPTQSolver.from_accumulator(acc, **kw)
    given = H.clone()
    owning = GPTQSolver(given, overwrite_h=True, **kw)
    # the upper factor of the damped inverse, against a float64 reference
    perm = torch.arange(IN) if copying.perm is None else copying.perm
    Hp = H.double()[perm][:, perm]
    Hp[Hp.diag() == 0, Hp.diag() == 0] = 1
    Hp += 0.01 * Hp.diag().mean() * torch.eye(IN, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    torch.testing.assert_close(copying.hinv.double(), U, rtol=1e-4, atol=1e-5)
    assert copying.hinv.is_contiguous()
    ref = copying.quantize(W, spec, block_size=32)
    for solver in (consuming, owning):
        assert torch.equal(solver.hinv, copying.hinv)
        got = solver.quantize(W, spec, block_size=32)
        assert torch.equal(got.weight.codes, ref.weight.codes)
        assert torch.equal(got.weight.scales, ref.weight.scales)
        assert torch.equal(got.weight.g_idx, ref.weight.g_idx)
        assert got.loss == ref.loss
    assert acc.consumed and acc.sum.numel() == 0


def test_damping_retry_keeps_h_for_the_next_try() -> None:
    """Damping 0 fails on a singular H; the retry must start again from the undamped H."""
    x = correlated_inputs(16, torch.float64)  # 16 rows: H of rank 16 in 128 dims
    H = hessian_of(x)
    solver = GPTQSolver(H, damp=0.0)
    assert solver.damp == pytest.approx(1e-2)
    Hd = H + solver.damp * H.diag().mean() * torch.eye(IN, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    torch.testing.assert_close(solver.hinv, U, rtol=1e-8, atol=1e-10)


def test_scaled_hessian_in_place() -> None:
    from shardquant.algorithms.awq import scaled_hessian

    H = hessian_of(correlated_inputs(256, torch.float32))
    s = torch.rand(IN, generator=torch.Generator().manual_seed(11)) + 0.5
    ref = H.double() / torch.outer(s.double(), s.double())
    out = scaled_hessian(H, s)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    buffer = H.clone()
    assert scaled_hessian(buffer, s, inplace=True, panel=48) is buffer
    assert torch.equal(buffer, out)


# --- row-split solves ----------------------------------------------------------------------

ROWS = 50
SPLITS = [[(0, ROWS)], "2", "3", [(0, 7), (7, 31), (31, ROWS)]]
SPLIT_CASES = [
    (act, sym, group, static, reorder)
    for act in (False, True)
    for sym in (True, False)
    for group, static, reorder in [(32, False, "none"), (32, True, "none"), (32, False, "group"), (-1, False, "none")]
    if not (act and reorder == "group")
]


def test_split_rows() -> None:
    from shardquant.algorithms.gptq import split_rows

    assert split_rows(50, 1) == [(0, 50)]
    assert split_rows(50, 3) == [(0, 17), (17, 34), (34, 50)]
    assert split_rows(5, 5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    for bad in (0, 6):
        with pytest.raises(ValueError, match="cannot split"):
            split_rows(5, bad)


@pytest.mark.parametrize(("act_order", "sym", "group", "static", "reorder"), SPLIT_CASES)
def test_row_slices_equal_one_solve(act_order, sym, group, static, reorder) -> None:
    """Row slices of one linear (k = 1, 2, 3 and uneven), each solved alone with one shared
    solver, concatenated: the same codes, scales, zeros and g_idx as one solve (float32 and
    float64), and as the float64 textbook."""
    from shardquant.algorithms.gptq import split_rows
    from shardquant.algorithms.quantizer import concat_rows

    x = correlated_inputs(512, torch.float64)
    x[:, 5] = 0
    H = hessian_of(x)
    spec = QuantSpec(bits=4, group_size=group, symmetric=sym)
    kw = {"act_order": act_order, "reorder": reorder, "group_size": group}
    W = torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    codes, scales, zeros, g_idx, loss = textbook_gptq(
        W, H, bits=4, group=group, sym=sym, act_order=act_order, static_groups=static, reorder=reorder
    )
    for dtype in (torch.float32, torch.float64):
        solver = GPTQSolver(H.to(dtype), **kw)
        Wd = W.to(dtype)
        whole = solver.quantize(Wd, spec, block_size=20, static_groups=static)
        for split in SPLITS:
            slices = split_rows(ROWS, int(split)) if isinstance(split, str) else split
            parts = [solver.quantize(Wd[a:b], spec, block_size=20, static_groups=static) for a, b in slices]
            got = concat_rows([p.weight for p in parts])
            for key in ("codes", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(got, key), getattr(whole.weight, key)), (dtype, split, key)
            assert sum(p.loss for p in parts) == pytest.approx(whole.loss, rel=1e-6)
    # float64: also the textbook's numbers
    assert torch.equal(got.codes.long(), codes)
    assert torch.equal(got.scales.double(), scales)
    assert torch.equal(got.zeros.long(), zeros)
    assert torch.equal(got.g_idx.long(), g_idx)
    assert sum(p.loss for p in parts) == pytest.approx(loss, rel=1e-9)


def test_concat_rows_refuses_parts_of_different_solves() -> None:
    from shardquant.algorithms.quantizer import concat_rows

    H = hessian_of(correlated_inputs(256, torch.float32))
    W = torch.randn(8, IN, generator=torch.Generator().manual_seed(13))
    spec = QuantSpec(bits=4, group_size=32)
    act = GPTQSolver(H, act_order=True).quantize(W, spec).weight
    plain = GPTQSolver(H).quantize(W, spec).weight
    with pytest.raises(ValueError, match="g_idx"):
        concat_rows([act, plain])
    other = GPTQSolver(H).quantize(W, QuantSpec(bits=3, group_size=32)).weight
    with pytest.raises(ValueError, match="specs"):
        concat_rows([plain, other])
    with pytest.raises(ValueError, match="no parts"):
        concat_rows([])
