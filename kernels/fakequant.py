"""Fake quantization (quantize then dequantize) of a weight per group in one pass.

``fake_quant(w, ...)`` equals ``algorithms.awq.scaled_fake_quantize`` (``Q(w * s) / s`` with an
optional per-input-channel pre-scale ``s``) and, without ``s``, ``awq.fake_quantize_weight``:
min/max qparams per group of consecutive columns (the range always includes 0, a scale
rounded through the scale dtype), ``clamp(round(x / scale) + zero, 0, maxq)``, then
``(q - zero) * scale``, float32 out. One program handles a tile of rows of one group, reading
the group twice (its range, then its values) without a fake-quantized copy in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._round import LIM, RND, qparams, scale_kind, tile

ROWS = 16  # rows per program on a GPU
CHUNK = 128  # columns a program reads at once (a longer group is read in chunks)


@triton.jit
def _fake_quant_kernel(
    W, S, Out, rows, cols, glen, tiny, smax,
    maxq: tl.constexpr, SYM: tl.constexpr, SCALE_KIND: tl.constexpr, HAS_S: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    g0 = tl.program_id(1) * glen
    g1 = tl.minimum(g0 + glen, cols)
    rmask = (r < rows)[:, None]
    xmin = tl.zeros([BR], tl.float32)
    xmax = tl.zeros([BR], tl.float32)
    for k in range(g0, g1, BC):
        c = k + tl.arange(0, BC)
        m = rmask & (c < g1)[None, :]
        x = tl.load(W + r[:, None] * cols + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_S:
            x = x * tl.load(S + c, mask=c < g1, other=1.0)[None, :]
        xmin = tl.minimum(xmin, tl.min(x, axis=1))
        xmax = tl.maximum(xmax, tl.max(x, axis=1))
    scale, zero = qparams(xmin, xmax, maxq, SYM, SCALE_KIND, tiny, smax)
    scale = scale[:, None]
    zero = zero[:, None]
    for k in range(g0, g1, BC):
        c = k + tl.arange(0, BC)
        m = rmask & (c < g1)[None, :]
        x = tl.load(W + r[:, None] * cols + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_S:
            s = tl.load(S + c, mask=c < g1, other=1.0)[None, :]
            x = x * s
        t = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -LIM), LIM)
        q = tl.minimum(tl.maximum(((t + RND) - RND) + zero, 0.0), maxq * 1.0)
        y = (q - zero) * scale
        if HAS_S:
            y = tl.math.div_rn(y, s)
        tl.store(Out + r[:, None] * cols + c[None, :], y, mask=m)


def fake_quant(
    w: Tensor, *, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype | None = torch.float16,
    pre_scale: Tensor | None = None,
) -> Tensor:
    """Float32 ``Q(w * s) / s`` of ``w`` [rows, cols] (``s`` = ``pre_scale`` [cols], or none),
    per group of ``group_size`` consecutive columns (-1: the whole row)."""
    if w.dim() != 2:
        raise ValueError(f"w must be [rows, cols], got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the fake-quant kernel reads float32/float16/bfloat16, got {w.dtype}")
    w = w.contiguous()
    rows, cols = w.shape
    glen = cols if group_size == -1 else group_size
    s = None if pre_scale is None else pre_scale.to(device=w.device, dtype=torch.float32).contiguous()
    if s is not None and s.shape != (cols,):
        raise ValueError(f"pre_scale must be [{cols}], got shape {tuple(s.shape)}")
    out = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
    if w.numel() == 0:
        return out
    kind, tiny, smax = scale_kind(scale_dtype)
    br = tile(rows, ROWS)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, glen))
    _fake_quant_kernel[grid](
        w, w if s is None else s, out, rows, cols, glen, tiny, smax,
        maxq=2**bits - 1, SYM=symmetric, SCALE_KIND=kind, HAS_S=s is not None,
        BR=br, BC=tile(glen, min(CHUNK, max(16, triton.next_power_of_2(glen))), 1024),
        enable_fp_fusion=False,  # round every product as torch does: no fused multiply-adds
    )
    return out
