"""Helpers shared by the kernels: IEEE rounding that the CPU interpreter also runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import select

# Globals a kernel reads must be constexpr (the compiler refuses others; the interpreter does not).
RND = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + RND rounds x to an integer, ties to even, for |x| <= 2**22
LIM = tl.constexpr(4194304.0)  # 2**22


@triton.jit
def rne(x):
    """Round to nearest, ties to even (``torch.round``) for |x| <= 2**22; larger values come
    back clamped to ±2**22, which every caller then clamps to a code range far inside it.
    Plain IEEE adds (no libdevice, which the CPU interpreter lacks): ``x + 1.5 * 2**23`` has
    ulp 1, so it is rounded once, and subtracting the constant again is exact."""
    return (tl.minimum(tl.maximum(x, -LIM), LIM) + RND) - RND


@triton.jit
def qparams(xmin, xmax, maxq: tl.constexpr, SYM: tl.constexpr, SCALE_KIND: tl.constexpr, tiny, smax):
    """Scale and zero of the ranges ``[xmin, xmax]`` (``xmin <= 0 <= xmax``), float32, with the
    arithmetic of ``algorithms.quantizer.range_qparams``: ``SCALE_KIND`` 1 rounds the scale
    to float16, 2 to bfloat16, 0 keeps float32 (``tiny``/``smax``: that dtype's clamp)."""
    if SYM:
        scale = tl.math.div_rn(2.0 * tl.maximum(-xmin, xmax), maxq * 1.0)
    else:
        scale = tl.math.div_rn(xmax - xmin, maxq * 1.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    scale = tl.minimum(tl.maximum(scale, tiny), smax)
    if SCALE_KIND == 1:
        scale = scale.to(tl.float16).to(tl.float32)
    elif SCALE_KIND == 2:
        scale = scale.to(tl.bfloat16).to(tl.float32)
    if SYM:
        zero = tl.zeros_like(scale) + ((maxq + 1) // 2)
    else:
        zero = tl.minimum(tl.maximum(rne(tl.math.div_rn(-xmin, scale)), 0.0), maxq * 1.0)
    return scale, zero


@triton.jit
def round_to(x, KIND: tl.constexpr):
    """Float32 ``x`` rounded (ties to even) to float16 (``KIND`` 1) or bfloat16 (2), back in
    float32: what a torch op in that dtype stores; ``KIND`` 0 keeps ``x``. The bfloat16
    rounding is torch's own integer formula (the CPU interpreter's ``.to(tl.bfloat16)``
    truncates), so it is the same on a GPU and in the interpreter (NaN aside)."""
    if KIND == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif KIND == 2:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (32767 + ((u >> 16) & 1))) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x


def tile(n: int, gpu: int, interpreted: int = 256) -> int:
    """Tile length for ``n`` elements: ``gpu`` on a device; in the CPU interpreter, whose cost
    is per operation rather than per element, one tile of up to ``interpreted``."""
    if select.interpreting():
        return max(16, min(interpreted, triton.next_power_of_2(n)))
    return gpu


def scale_kind(dtype: torch.dtype | None) -> tuple[int, float, float]:
    """``(SCALE_KIND, tiny, max)`` of a scale dtype for ``qparams`` (None: float32)."""
    kind = {None: 0, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}.get(dtype)
    if kind is None:
        raise ValueError(f"scales in {dtype} have no kernel")
    info = torch.finfo(dtype or torch.float32)
    return kind, float(info.tiny), float(info.max)
