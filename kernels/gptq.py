"""GPTQ's column loop over one block of columns in one launch (integer quantizers).

``algorithms.gptq._solve`` is the reference: for each column in processing order, round it
through its group's qparams, take the scaled error ``(w - dequant(q)) / d`` and carry it into
the block's later columns through the upper Cholesky factor ``U`` of H^-1. Here one program
holds a tile of output rows of the whole block in registers and runs that loop for them, so
a block costs one launch instead of a few per column; the update past the block stays one
matmul in the caller.

A group that starts inside the block (dynamic groups, ``qend[c] > 0``) gets its min/max
qparams here, from its columns as they are when it is reached, which must all lie in the
block; every other group's qparams are read from ``scales``/``zeros``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._round import LIM, RND, qparams, scale_kind, tile
from .select import GPTQ_MAX_BLOCK

MAX_BLOCK = GPTQ_MAX_BLOCK  # columns one launch holds (registers: MAX_BLOCK x ROWS floats a program)
ROWS = 16  # output rows per program on a GPU


@triton.jit
def _gptq_block_kernel(
    W, U, Q, E, S, Z, G, QEND,
    rows, n, i1, nb, tiny, smax,
    maxq: tl.constexpr, SYM: tl.constexpr, SCALE_KIND: tl.constexpr,
    BS: tl.constexpr, BR: tl.constexpr,
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < rows
    j = tl.arange(0, BS)
    jmask = j < nb
    blk = tl.load(W + (i1 + j)[:, None] * rows + r[None, :], mask=jmask[:, None] & rmask[None, :], other=0.0)
    s = tl.full([BR], 1.0, tl.float32)
    z = tl.zeros([BR], tl.float32)
    gprev = -1
    for c in range(0, nb):
        col = i1 + c
        g = tl.load(G + col)
        qend = tl.load(QEND + col)
        w = tl.sum(tl.where((j == c)[:, None], blk, 0.0), axis=0)
        if qend > 0:  # a dynamic group starts here: its range over its current columns
            inside = ((j >= c) & (j < qend - i1))[:, None]
            xmin = tl.minimum(tl.min(tl.where(inside, blk, float("inf")), axis=0), 0.0)
            xmax = tl.maximum(tl.max(tl.where(inside, blk, float("-inf")), axis=0), 0.0)
            s, z = qparams(xmin, xmax, maxq, SYM, SCALE_KIND, tiny, smax)
            tl.store(S + g * rows + r, s, mask=rmask)
            tl.store(Z + g * rows + r, z, mask=rmask)
        elif g != gprev:
            s = tl.load(S + g * rows + r, mask=rmask, other=1.0)
            z = tl.load(Z + g * rows + r, mask=rmask, other=0.0)
        gprev = g
        x = tl.minimum(tl.maximum(tl.math.div_rn(w, s), -LIM), LIM)
        q = tl.minimum(tl.maximum(((x + RND) - RND) + z, 0.0), maxq * 1.0)  # rne(x), inline: a call costs
        d = tl.load(U + col * n + col)
        e = tl.math.div_rn(w - (q - z) * s, d)
        tl.store(Q + col * rows + r, q, mask=rmask)
        tl.store(E + c * rows + r, e, mask=rmask)
        u = tl.load(U + col * n + i1 + j, mask=jmask & (j > c), other=0.0)
        blk = blk - u[:, None] * e[None, :]


def gptq_block(
    Wt: Tensor, U: Tensor, Q: Tensor, E: Tensor, scales: Tensor, zeros: Tensor, col_group: Tensor,
    qend: Tensor, i1: int, i2: int, *, maxq: int, symmetric: bool, scale_dtype: torch.dtype | None,
) -> None:
    """Quantize processing columns [i1, i2) of ``Wt`` [n, rows] (float32, transposed, current
    up to this block) with error feedback inside the block.

    Writes the codes (as floats) into ``Q[i1:i2]`` [n, rows] and the scaled errors into
    ``E[:i2 - i1]`` [>= i2 - i1, rows]; ``Wt`` is only read. ``U`` [n, n] is the upper factor
    of H^-1 in processing order, ``col_group`` (int32 [n]) each column's group, ``scales`` /
    ``zeros`` [n_groups, rows] their qparams (read, and written for a group starting at a
    column ``c`` with ``qend[c] > 0``, int32 [n]: where that group ends, inside the block).
    """
    nb = i2 - i1
    if not 0 < nb <= MAX_BLOCK:
        raise ValueError(f"a block holds 1..{MAX_BLOCK} columns, got {nb}")
    n, rows = Wt.shape
    for t in (Wt, U, Q, E, scales, zeros):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("the GPTQ kernel works on contiguous float32 tensors")
    kind, tiny, smax = scale_kind(scale_dtype)
    br = tile(rows, ROWS)
    grid = (triton.cdiv(rows, br),)
    _gptq_block_kernel[grid](
        Wt, U, Q, E, scales, zeros, col_group, qend, rows, n, i1, nb, tiny, smax,
        maxq=maxq, SYM=symmetric, SCALE_KIND=kind, BS=max(16, triton.next_power_of_2(nb)), BR=br,
        enable_fp_fusion=False,  # round every product as torch does: no fused multiply-adds
    )
