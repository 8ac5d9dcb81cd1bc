"""Fake quantization (quantize then dequantize) of a weight per group in one pass.

``fake_quant(w, ...)`` equals ``algorithms.awq.scaled_fake_quantize`` (``Q(w * s) / s`` with an
optional per-input-channel pre-scale ``s``) and, without ``s``, ``awq.fake_quantize_weight``:
min/max qparams per group of consecutive columns (the range always includes 0, a scale
rounded through the scale dtype), ``clamp(round(x / scale) + zero, 0, maxq)``, then
``(q - zero) * scale``, float32 out. One program handles a tile of rows of one group, reading
the group twice (its range, then its values) without a fake-quantized copy in between.

``fake_quant_tokens(x, bits=8)`` runs the same kernel with compressed-tensors' arithmetic for a
dynamic symmetric per-token integer input (W8A8's activations; reference: the library's
``compute_dynamic_scales_and_zp`` + ``fake_quantize``), one group = one row, every step rounded
to the input's dtype as the library's torch ops are: ``scale = absmax / ((2**bits - 1) / 2)``
(127.5 for int8) in that dtype, a zero scale replaced by the dtype's eps,
``q = clamp(round(x / scale), -2**(bits-1), 2**(bits-1) - 1)`` (the quotient in that dtype,
ties to even, the sign of a zero kept), out ``q * scale`` in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._round import LIM, RND, qparams, rne, round_to, scale_kind, tile

ROWS = 16  # rows per program on a GPU
CHUNK = 128  # columns a program reads at once (a longer group is read in chunks)


@triton.jit
def _fake_quant_kernel(
    W, S, Out, rows, cols, glen, tiny, smax, eps,
    maxq: tl.constexpr, SYM: tl.constexpr, SCALE_KIND: tl.constexpr, HAS_S: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, CT: tl.constexpr = False, XK: tl.constexpr = 0,
):
    # CT: compressed-tensors' symmetric signed arithmetic, each step rounded to the input's
    # dtype (XK: 0 float32, 1 float16, 2 bfloat16; Out in that dtype, eps: its epsilon).
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
    if CT:
        scale = round_to(tl.math.div_rn(tl.maximum(-xmin, xmax), maxq * 0.5), XK)
        scale = tl.where(scale == 0.0, eps, scale)
        zero = tl.zeros_like(scale)
    else:
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
        if CT:
            t = round_to(tl.math.div_rn(x, scale), XK)
            q = rne(t)
            q = tl.where(t < 0.0, tl.abs(q) * -1.0, tl.abs(q))  # torch.round(-0.3) is -0.0 (unary minus is 0 - x: +0)
            q = tl.minimum(tl.maximum(q, -((maxq + 1) // 2) * 1.0), ((maxq - 1) // 2) * 1.0)
            y = round_to(q * scale, XK).to(Out.dtype.element_ty)  # exact: already rounded
        else:
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
        w, w if s is None else s, out, rows, cols, glen, tiny, smax, 0.0,
        maxq=2**bits - 1, SYM=symmetric, SCALE_KIND=kind, HAS_S=s is not None,
        BR=br, BC=tile(glen, min(CHUNK, max(16, triton.next_power_of_2(glen))), 1024),
        enable_fp_fusion=False,  # round every product as torch does: no fused multiply-adds
    )
    return out


def fake_quant_tokens(x: Tensor, *, bits: int = 8) -> Tensor:
    """``x`` [tokens, cols] (float32/float16/bfloat16) quantized and dequantized as
    compressed-tensors does a dynamic symmetric per-token ``bits``-bit integer input, one
    scale per row, in ``x``'s dtype."""
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, cols], got shape {tuple(x.shape)}")
    kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}.get(x.dtype)
    if kind is None:
        raise ValueError(f"the fake-quant kernel reads float32/float16/bfloat16, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    br = tile(rows, ROWS)
    _fake_quant_kernel[(triton.cdiv(rows, br), 1)](
        x, x, out, rows, cols, cols, 0.0, 0.0, float(torch.finfo(x.dtype).eps),
        maxq=2**bits - 1, SYM=True, SCALE_KIND=0, HAS_S=False,
        BR=br, BC=tile(cols, min(CHUNK, max(16, triton.next_power_of_2(cols))), 1024), CT=True, XK=kind,
        enable_fp_fusion=False,
    )
    return out
