"""Quantizer, RTN and Hessian accumulation against formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import (
    QuantSpec,
    compute_qparams,
    dequantize_codes,
    fake_quantize,
    quantize_codes,
)
from shardquant.algorithms.rtn import quantize_rtn


def reference_rtn(w: torch.Tensor, bits: int, group: int, sym: bool):
    """Row by row, group by group, in float32 scalars, with fp16 scales spelled out."""
    maxq = 2**bits - 1
    out_f, in_f = w.shape
    glen = in_f if group == -1 else group
    codes = torch.empty(out_f, in_f, dtype=torch.int64)
    scales = torch.empty(out_f, -(-in_f // glen))
    zeros = torch.empty(out_f, -(-in_f // glen), dtype=torch.int64)
    zero32 = torch.tensor(0.0)
    for r in range(out_f):
        for gi, start in enumerate(range(0, in_f, glen)):
            x = w[r, start : start + glen].float()
            lo, hi = torch.minimum(x.min(), zero32), torch.maximum(x.max(), zero32)
            span = 2 * torch.maximum(-lo, hi) if sym else hi - lo
            s = span / maxq if span > 0 else torch.tensor(1.0)
            s = s.half().float()
            z = 2 ** (bits - 1) if sym else int(torch.round(-lo / s).clamp(0, maxq))
            for j in range(x.numel()):
                codes[r, start + j] = int(torch.round(x[j] / s).clamp(-z, maxq - z)) + z
            scales[r, gi] = s
            zeros[r, gi] = z
    return codes, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_direct_formula(bits: int, group: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + group)
    w = torch.randn(6, 64, generator=gen) * torch.rand(6, 1, generator=gen)
    w[0] = w[0].abs()  # a row with no negative values: range must still include 0
    qw = quantize_rtn(w, QuantSpec(bits=bits, group_size=group, symmetric=sym))
    codes, scales, zeros = reference_rtn(w, bits, group, sym)
    assert qw.codes.dtype == torch.uint8 and qw.zeros.dtype == torch.int32
    assert qw.scales.dtype == torch.float32
    assert torch.equal(qw.codes.long(), codes)
    assert torch.equal(qw.scales, scales)
    assert torch.equal(qw.zeros.long(), zeros)
    glen = 64 if group == -1 else group
    assert torch.equal(qw.g_idx, torch.arange(64, dtype=torch.int32) // glen)


def test_partial_last_group() -> None:
    w = torch.randn(3, 40)
    qw = quantize_rtn(w, QuantSpec(bits=4, group_size=16))
    codes, scales, zeros = reference_rtn(w, 4, 16, True)
    assert qw.scales.shape == (3, 3)
    assert torch.equal(qw.codes.long(), codes)
    assert torch.equal(qw.scales, scales)


@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_error_within_half_step(sym: bool) -> None:
    w = torch.randn(32, 128)
    spec = QuantSpec(bits=4, group_size=32, symmetric=sym)
    qw = quantize_rtn(w, spec)
    step = qw.scales[:, qw.g_idx.long()]
    # the one clipped code (sym max, or asym zero rounding) can add at most a half step more
    assert ((w - qw.dequantize()).abs() <= step * (1 + 1e-3)).all()
    inside = (w - qw.dequantize()).abs() <= step / 2 * (1 + 1e-6)
    assert inside.float().mean() > 0.98


@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_group_is_finite(sym: bool) -> None:
    w = torch.randn(4, 64)
    w[:, :32] = 0
    w[2] = 0
    qw = quantize_rtn(w, QuantSpec(bits=4, group_size=32, symmetric=sym))
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert (deq[:, :32] == 0).all() and (deq[2] == 0).all()


def test_scales_are_fp16_values_and_never_zero() -> None:
    w = torch.randn(8, 64) * torch.logspace(-9, 3, 8).unsqueeze(1)
    qw = quantize_rtn(w, QuantSpec(bits=4, group_size=32))
    assert torch.equal(qw.scales.half().float(), qw.scales)
    assert (qw.scales >= torch.finfo(torch.float16).tiny).all()
    fp32 = quantize_rtn(w, QuantSpec(bits=4, group_size=32, scale_dtype=None))
    assert not torch.equal(fp32.scales.half().float(), fp32.scales)


def test_dequantize_matches_fake_quantize() -> None:
    w = torch.randn(16, 96, dtype=torch.bfloat16)
    spec = QuantSpec(bits=3, group_size=32, symmetric=False)
    qw = quantize_rtn(w, spec)
    scale, zero = compute_qparams(w.float().reshape(16, 3, 32), spec)
    fq = fake_quantize(w.float().reshape(16, 3, 32), scale, zero, spec.maxq).reshape(16, 96)
    assert torch.equal(qw.dequantize(), fq)
    codes = quantize_codes(w.float().reshape(16, 3, 32), scale, zero, spec.maxq)
    assert torch.equal(dequantize_codes(codes, scale, zero).reshape(16, 96), fq)


def test_symmetric_codes_are_signed_range_shifted() -> None:
    spec = QuantSpec(bits=4, group_size=-1)
    scale, zero = compute_qparams(torch.tensor([[-1.0, 0.5, 1.0]]), spec)
    assert zero.item() == 8
    codes = quantize_codes(torch.tensor([[-1.0, 0.0, 1.0]]), scale, zero, spec.maxq)
    assert codes.dtype == torch.uint8 and (codes.long() - 8).tolist() == [[-8, 0, 7]]


def test_spec_validation_and_groups() -> None:
    with pytest.raises(ValueError):
        QuantSpec(bits=1)
    with pytest.raises(ValueError):
        QuantSpec(group_size=0)
    spec = QuantSpec(bits=3, group_size=128)
    assert spec.maxq == 7
    assert spec.n_groups(4096) == 32 and spec.group_len(4096) == 128
    assert QuantSpec(group_size=-1).n_groups(4096) == 1
    assert QuantSpec(group_size=-1).group_len(4096) == 4096


@settings(max_examples=150, deadline=None)
@given(
    out_f=st.integers(1, 6),
    in_f=st.integers(1, 70),
    bits=st.integers(2, 8),
    group=st.sampled_from([-1, 1, 4, 8, 16, 32]),
    sym=st.booleans(),
    fp16_scale=st.booleans(),
    log_mag=st.integers(-6, 4),
    zero_frac=st.sampled_from([0.0, 0.5, 1.0]),
    shift=st.sampled_from([0.0, 1.0, -1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rtn_properties(
    out_f, in_f, bits, group, sym, fp16_scale, log_mag, zero_frac, shift, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=gen) + shift) * 10.0**log_mag
    w[torch.rand(out_f, in_f, generator=gen) < zero_frac] = 0
    spec = QuantSpec(
        bits=bits,
        group_size=group,
        symmetric=sym,
        scale_dtype=torch.float16 if fp16_scale else None,
    )
    qw = quantize_rtn(w, spec)
    assert qw.scales.shape == (out_f, math.ceil(in_f / spec.group_len(in_f)))
    assert ((qw.codes >= 0) & (qw.codes <= spec.maxq)).all()
    assert ((qw.zeros >= 0) & (qw.zeros <= spec.maxq)).all()
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    g = qw.g_idx.long()
    scale, zero = qw.scales[:, g].double(), qw.zeros[:, g].double()
    deq = qw.dequantize().double()
    err = (w.double() - deq).abs()
    eps = 1e-6 * (scale + w.double().abs())  # float32 rounding of w / scale
    lo, hi = (0 - zero) * scale, (spec.maxq - zero) * scale
    inside = (w >= lo) & (w <= hi)
    assert (err[inside] <= (scale / 2 + eps)[inside]).all()
    assert (err <= scale + eps).all()  # clipping at the range ends costs at most one step
    assert (deq[w == 0] == 0).all()


def test_hessian_matches_direct_and_merges_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (5, 7, 24), generator=gen).double()  # exact in float64
    whole = HessianAccumulator(24, dtype=torch.float64)
    whole.add(x)
    a, b = HessianAccumulator(24, dtype=torch.float64), HessianAccumulator(24, dtype=torch.float64)
    a.add(x[:2])
    b.add(x[2:].reshape(-1, 24)[:9])
    b.add(x[2:].reshape(-1, 24)[9:])
    a.merge(b)
    assert a.count == whole.count == 35
    assert torch.equal(a.sum, whole.sum)
    rows = x.reshape(-1, 24)
    assert torch.equal(whole.hessian(), 2 * rows.T @ rows / 35)
    for panel in (5, 8, 24, 100):  # the triangle in panels that do and don't divide 24
        acc = HessianAccumulator(24, dtype=torch.float64, panel=panel)
        acc.add(x)
        assert torch.equal(acc.hessian(), 2 * rows.T @ rows / 35), panel

    xf = torch.randn(3, 50, 16, generator=gen, dtype=torch.bfloat16)
    acc = HessianAccumulator(16)
    acc.add(xf)
    rows = xf.reshape(-1, 16).double()
    assert acc.sum.dtype == torch.float32
    torch.testing.assert_close(
        acc.hessian().double(), 2 * rows.T @ rows / 150, rtol=1e-5, atol=1e-5
    )


def test_hessian_errors() -> None:
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError):
        acc.hessian()
    with pytest.raises(ValueError):
        acc.add(torch.randn(4, 9))


def _group_error(w: torch.Tensor, spec: QuantSpec, scale, zero, norm: float) -> torch.Tensor:
    return (fake_quantize(w, scale, zero, spec.maxq) - w).abs().pow(norm).sum(-1)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    norm=st.sampled_from([2.0, 2.4]),
    outlier=st.floats(1.0, 20.0),
)
def test_mse_search_never_worse_than_min_max(seed, bits, sym, norm, outlier) -> None:
    from shardquant.algorithms.quantizer import MSEGrid, mse_qparams

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 4, 32, generator=gen)
    w[:, :, 0] *= outlier
    spec = QuantSpec(bits=bits, group_size=32, symmetric=sym)
    s0, z0 = compute_qparams(w, spec)
    grid = MSEGrid(grid=50, max_shrink=0.5, norm=norm)
    s1, z1 = mse_qparams(w, spec, grid)
    e0, e1 = _group_error(w, spec, s0, z0, norm), _group_error(w, spec, s1, z1, norm)
    assert (e1 <= e0).all()
    assert ((z1 >= 0) & (z1 <= spec.maxq)).all() and (s1 > 0).all()
    # scales are still stored exactly in the scale dtype
    assert torch.equal(s1, s1.half().float())


def test_mse_search_shrinks_outlier_groups_and_rtn_uses_it() -> None:
    from shardquant.algorithms.quantizer import MSEGrid

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    w[:, ::32] *= 10  # one outlier per group of 32: min/max wastes most of the grid
    spec = QuantSpec(bits=3, group_size=32, symmetric=True)
    plain = quantize_rtn(w, spec)
    searched = quantize_rtn(w, spec, mse=MSEGrid(grid=100, max_shrink=0.8, norm=2.0))
    assert (searched.scales <= plain.scales).all() and (searched.scales < plain.scales).any()
    e_plain = (w - plain.dequantize()).pow(2).sum()
    e_searched = (w - searched.dequantize()).pow(2).sum()
    assert e_searched < e_plain
    assert MSEGrid(grid=10, max_shrink=0.3).ratios() == pytest.approx([1.0, 0.9, 0.8])
    with pytest.raises(ValueError, match="max_shrink"):
        MSEGrid(max_shrink=1.0)
