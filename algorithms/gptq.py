"""GPTQ: column-by-column quantization with second-order error compensation.

Each column is rounded in turn and its error is spread over the not yet quantized columns
through the upper Cholesky factor of H^-1 (Frantar et al., 2022). Updates to columns beyond
the current block are applied lazily, once per block, as one matmul.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from shardquant.algorithms.counts import n_groups
from shardquant.kernels import select

from .floatq import (
    FloatQuantizedWeight,
    FloatSpec,
    absmax_scales,
    global_scale,
    round_elements,
    row_absmax,
)
from .hessian import HessianAccumulator
from .quantizer import MSEGrid, QuantizedWeight, QuantSpec, group_qparams, search_qparams

_DAMP_RETRIES = 4  # each retry multiplies the damping by 10
_SUB = 16  # columns per inner lazy sub-block of _solve
_SERIAL_MAX = 2**24  # CPU problems up to this many weight entries are solved on one thread


@contextmanager
def _one_cpu_thread(t: Tensor, numel: int) -> Iterator[None]:
    """Run a small CPU solve on one intra-op thread, restoring the setting after.

    GPTQ's steps are many small ops; each one big enough to be split wakes the thread pool,
    and on a busy machine waiting for a descheduled thread costs far more than the op
    (measured: 2 threads were 5-20x slower than 1 on a loaded 2-core machine, and no
    faster on an idle one, for SmolLM2-sized layers). GPU tensors and large layers keep
    the caller's setting.
    """
    n = torch.get_num_threads()
    if t.device.type != "cpu" or numel > _SERIAL_MAX or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class GPTQResult:
    """A quantized weight and GPTQ's objective: sum of ((w - q) / d)^2 / 2 over all entries,
    d being the diagonal of the upper Cholesky factor of H^-1 at that column."""

    weight: QuantizedWeight | FloatQuantizedWeight
    loss: float


Reorder = Literal["none", "group"]
GroupRange = Literal["current", "block_start"]


class GPTQSolver:
    """Factorizes one Hessian once so that all linears sharing that input reuse it.

    Handles dead columns (zero diagonal), the column permutation, damping and the upper
    Cholesky factor of the damped H^-1. Computes in float32, or in float64 when ``H`` is
    float64. If Cholesky fails, damping is raised tenfold up to a few times; the fraction
    finally used is ``self.damp``.

    Column orders: ``act_order`` processes columns by decreasing Hessian diagonal, groups then
    follow the processing order (the checkpoint needs ``g_idx``). ``reorder="group"`` (group-aware
    reordering, Gafni et al. 2025, GPTQModel's ``act_group_aware``) keeps every group a fixed
    run of ``group_size`` consecutive input columns, processes groups by decreasing largest
    diagonal and the columns of a group by decreasing diagonal, so ``g_idx`` stays
    ``j // group_size`` and the checkpoint needs none. The group size is fixed at
    construction (``group_size``, -1 = one group) because it shapes the order.

    Memory: the factorization holds two in×in matrices, H (the caller's own with
    ``overwrite_h=True``, which leaves it garbage, else one copy) and a work buffer where the
    factor, the inverse and its factor are computed in place; only that buffer (``hinv``) is
    kept. ``from_accumulator`` builds H in the accumulator's buffer, so a solve needs one
    in×in matrix beyond the statistics it is fed. The factorization does not depend on the
    weights, so a linear may be solved in row slices (``split_rows``, ``concat_rows``).
    """

    def __init__(
        self,
        H: Tensor,
        *,
        damp: float = 0.01,
        act_order: bool = False,
        reorder: Reorder = "none",
        group_size: int | None = None,
        overwrite_h: bool = False,
    ) -> None:
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
        if damp < 0:
            raise ValueError(f"damp must be >= 0, got {damp}")
        if reorder not in ("none", "group"):
            raise ValueError(f"reorder must be 'none' or 'group', got {reorder!r}")
        if reorder == "group" and act_order:
            raise ValueError("act_order and reorder='group' exclude each other")
        if reorder == "group" and group_size is None:
            raise ValueError("reorder='group' needs the group_size it orders by")
        if not _all_finite(H):
            raise ValueError("H has non-finite entries")
        self.dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
        # The working matrix: H itself when the caller hands it over, else its one copy.
        owned = overwrite_h and H.dtype == self.dtype and H.is_contiguous()
        H = H if owned else torch.empty(H.shape, dtype=self.dtype, device=H.device).copy_(H)
        n = H.shape[0]
        diag = torch.diagonal(H)
        self.dead = diag == 0
        diag.masked_fill_(self.dead, 1)
        self.act_order = act_order
        self.reorder = reorder
        self.group_size = group_size
        self.perm: Tensor | None = None
        self.invperm: Tensor | None = None
        if act_order:
            self.perm = torch.argsort(diag, descending=True, stable=True)
        elif reorder == "group":
            glen = n if group_size == -1 else group_size
            self.perm = group_aware_order(diag, glen)
        # The second matrix: the permuted rows, then the factors and the result.
        work = torch.empty_strided((n, n), (1, n), dtype=self.dtype, device=H.device)
        if self.perm is not None:
            self.invperm = torch.argsort(self.perm)
            rows = work.T  # row-major view of the same buffer
            torch.index_select(H, 0, self.perm, out=rows)
            torch.index_select(rows, 1, self.perm, out=H)
        with _one_cpu_thread(H, H.numel()):
            self.hinv, self.damp = _damped_inverse_cholesky(H, damp, work)

    @classmethod
    def from_accumulator(
        cls,
        acc: HessianAccumulator,
        *,
        consume: bool = True,
        damp: float = 0.01,
        act_order: bool = False,
        reorder: Reorder = "none",
        group_size: int | None = None,
    ) -> GPTQSolver:
        """A solver for ``acc``'s Hessian; the other arguments as for the constructor.

        With ``consume`` (default) H is built in the accumulator's buffer and factorized there,
        so the solve holds one in×in matrix beyond it (and none after); the accumulator is spent.
        """
        return cls(
            acc.hessian(consume=consume), damp=damp, act_order=act_order, reorder=reorder,
            group_size=group_size, overwrite_h=consume,
        )

    @property
    def in_features(self) -> int:
        """Number of input columns the Hessian describes."""
        return self.hinv.shape[0]

    def quantize(
        self,
        weight: Tensor,
        spec: QuantSpec | FloatSpec,
        *,
        block_size: int = 128,
        static_groups: bool = False,
        mse: MSEGrid | None = None,
        group_range: GroupRange = "current",
    ) -> GPTQResult:
        """Quantize ``weight`` [out, in]; codes and ``g_idx`` come back in original column order.

        Per-channel qparams, and with ``static_groups`` all group qparams, are computed from
        the original weight before any error update; otherwise a group's qparams come from
        its current (updated) weights when its first column, in processing order, is reached.
        ``mse`` searches each group's range shrink instead of taking min/max. With
        ``group_range="block_start"`` a dynamic group's range comes from its weights as they
        were when its lazy block (``block_size`` columns) began, as in the reference GPTQ
        implementations (AutoGPTQ, GPTQModel): the error updates of the block's earlier
        columns move the values but not the range.
        """
        return self.quantize_many(
            [weight], spec, block_size=block_size, static_groups=static_groups, mse=mse, group_range=group_range
        )[0]

    def quantize_many(
        self,
        weights: Sequence[Tensor],
        spec: QuantSpec | FloatSpec,
        *,
        block_size: int = 128,
        static_groups: bool = False,
        mse: MSEGrid | None = None,
        group_range: GroupRange = "current",
        global_scales: Sequence[Tensor] | None = None,
    ) -> list[GPTQResult]:
        """``quantize`` each of ``weights`` (linears sharing this input) in one pass.

        GPTQ treats every output row on its own, so the rows are stacked and the column loop
        runs once for all of them; each result equals a separate ``quantize`` call up to float
        summation order.

        ``spec`` is the quantizer every column is rounded through: an integer ``QuantSpec`` or
        a float ``FloatSpec`` (``_solve`` with ``_IntColumns`` or ``_FloatColumns``). For NVFP4, ``global_scales`` gives each
        weight's per-tensor global scale (default: from the weight as given, before any update).
        """
        if isinstance(spec, FloatSpec):
            return self._quantize_float(weights, spec, block_size=block_size, static_groups=static_groups,
                                        mse=mse, group_range=group_range, global_scales=global_scales)
        n = self.in_features
        for w in weights:
            if w.dim() != 2 or w.shape[1] != n:
                raise ValueError(f"weight must be [out, {n}], got shape {tuple(w.shape)}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if group_range not in ("current", "block_start"):
            raise ValueError(f"group_range must be 'current' or 'block_start', got {group_range!r}")
        if self.reorder == "group" and spec.group_size != self.group_size:
            raise ValueError(
                f"this solver orders groups of {self.group_size} columns, the spec has {spec.group_size}"
            )
        dev = self.hinv.device
        W = torch.cat([w.to(device=dev, dtype=self.dtype) for w in weights])
        W[:, self.dead] = 0
        glen = spec.group_len(n)
        dynamic = spec.group_size != -1 and not static_groups

        # g_idx: group of each original column; only plain act-order with dynamic groups makes
        # groups follow the processing order.
        cols = torch.arange(n, device=dev)
        if dynamic and self.act_order:
            g_idx = self.invperm // glen
        else:
            g_idx = cols // glen
        if dynamic:
            scales = W.new_empty(spec.n_groups(n), W.shape[0], dtype=torch.float32)
            zeros = torch.empty_like(scales)
        else:
            s0, z0 = group_qparams(W, spec, mse)
            scales, zeros = s0.T.contiguous(), z0.T.contiguous()
        if self.perm is not None:
            W = W[:, self.perm]
        order = cols if self.perm is None else self.perm
        fused = select.use_triton("gptq_block", W, supported=_fused_supported(self.dtype, spec, block_size, group_range))
        with _one_cpu_thread(W, W.numel()):
            if fused:
                codes, loss_rows = _solve_fused(
                    W.T.contiguous(), self.hinv, scales, zeros, g_idx[order].tolist(), spec,
                    block_size=block_size, dynamic=dynamic, mse=mse, block_start=group_range == "block_start",
                )
            else:
                codes, loss_rows = _solve(
                    W.T.contiguous(), self.hinv, g_idx[order].tolist(), _IntColumns(scales, zeros, spec, mse, W.dtype),
                    block_size=block_size, dynamic=dynamic, block_start=group_range == "block_start",
                )
        if self.invperm is not None:
            codes = codes[:, self.invperm]
        scales, zeros = scales.T.contiguous(), zeros.T.to(torch.int32).contiguous()
        g_idx = g_idx.to(torch.int32)
        results, r0 = [], 0
        for w in weights:
            r1 = r0 + w.shape[0]
            qweight = QuantizedWeight(
                codes=codes[r0:r1].contiguous(),
                scales=scales[r0:r1].contiguous(),
                zeros=zeros[r0:r1].contiguous(),
                g_idx=g_idx.clone(),
                spec=spec,
            )
            results.append(GPTQResult(weight=qweight, loss=loss_rows[r0:r1].sum().item() / 2))
            r0 = r1
        return results

    def _quantize_float(
        self,
        weights: Sequence[Tensor],
        spec: FloatSpec,
        *,
        block_size: int,
        static_groups: bool,
        mse: MSEGrid | None,
        group_range: GroupRange,
        global_scales: Sequence[Tensor] | None,
    ) -> list[GPTQResult]:
        """``quantize_many`` through a float quantizer (``_FloatColumns``)."""
        n = self.in_features
        for w in weights:
            if w.dim() != 2 or w.shape[1] != n:
                raise ValueError(f"weight must be [out, {n}], got shape {tuple(w.shape)}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if mse is not None:
            raise ValueError("the MSE range search is for integer specs")
        if group_range not in ("current", "block_start"):
            raise ValueError(f"group_range must be 'current' or 'block_start', got {group_range!r}")
        if self.reorder == "group" and spec.group_size != self.group_size:
            raise ValueError(f"this solver orders groups of {self.group_size} columns, the spec has {spec.group_size}")
        dynamic = spec.group_size != -1 and not static_groups
        if dynamic and self.act_order:
            raise ValueError("float formats keep groups of consecutive columns: act_order needs static_groups")
        if global_scales is not None and len(global_scales) != len(weights):
            raise ValueError("one global scale per weight")
        if spec.whole_rows and len(weights) > 1:  # row blocks (a tensor's scale) are one linear's: each alone
            return [r for i, w in enumerate(weights) for r in self._quantize_float(
                [w], spec, block_size=block_size, static_groups=static_groups, mse=None,
                group_range=group_range, global_scales=None if global_scales is None else [global_scales[i]])]
        dev = self.hinv.device
        grow = None
        if spec.has_global:
            gs = [global_scale(w) if global_scales is None else global_scales[i].float().reshape(1)
                  for i, w in enumerate(weights)]
            grow = torch.cat([g.to(dev).expand(w.shape[0]) for g, w in zip(gs, weights, strict=True)])
        W = torch.cat([w.to(device=dev, dtype=self.dtype) for w in weights])
        W[:, self.dead] = 0
        glen = spec.group_len(n)
        cols = torch.arange(n, device=dev)
        g_idx = cols // glen
        if dynamic:
            scales = W.new_empty(spec.n_groups(n), W.shape[0], dtype=torch.float32)
        else:
            g0 = None if grow is None else grow.unsqueeze(1)
            scales = absmax_scales(row_absmax(W, spec), spec, g0).T.contiguous()
        if self.perm is not None:
            W = W[:, self.perm]
        order = cols if self.perm is None else self.perm
        select.use_triton("gptq_block", W, supported=False)  # tallied: float schemes have no kernel
        with _one_cpu_thread(W, W.numel()):
            values, loss_rows = _solve(
                W.T.contiguous(), self.hinv, g_idx[order].tolist(), _FloatColumns(scales, grow, spec, W.dtype),
                block_size=block_size, dynamic=dynamic, block_start=group_range == "block_start",
            )
        if self.invperm is not None:
            values = values[:, self.invperm]
        scales = scales.T.contiguous()
        results, r0 = [], 0
        for w in weights:
            r1 = r0 + w.shape[0]
            qweight = FloatQuantizedWeight(
                values=values[r0:r1].contiguous(),
                scales=scales[r0:r1].contiguous(),
                global_scale=None if grow is None else grow[r0:r1].float().contiguous(),
                spec=spec,
            )
            results.append(GPTQResult(weight=qweight, loss=loss_rows[r0:r1].sum().item() / 2))
            r0 = r1
        return results


def _block_rows_max(a: Tensor, block_rows: int) -> Tensor:
    """``a`` [rows] with each run of ``block_rows`` rows replaced by its max (fp8 blocks)."""
    if block_rows == 1:
        return a
    nb = -(-a.numel() // block_rows)
    m = torch.nn.functional.pad(a, (0, nb * block_rows - a.numel())).view(nb, block_rows).amax(1)
    return m.repeat_interleave(block_rows)[: a.numel()]


def split_rows(out_features: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous row ranges ``[start, end)`` covering ``out_features`` rows, the first
    ``out_features % k`` one row longer (the split of runner/execution/packing.py ``split_range``).

    A linear's rows may be quantized in such slices, by one solver (or copies of it: it is
    plain tensors) each: GPTQ treats each row on its own and the factorization depends on H
    alone, so ``concat_rows`` of the slices' weights equals one solve's, and the whole loss is
    the sum of the slices' losses.
    """
    if not 1 <= k <= out_features:
        raise ValueError(f"cannot split {out_features} rows into {k} slices")
    base, extra = divmod(out_features, k)
    bounds = [r * base + min(r, extra) for r in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def group_aware_order(diag: Tensor, group_len: int) -> Tensor:
    """Processing order of group-aware reordering: groups of ``group_len`` consecutive columns
    (a trailing partial group counts) by decreasing largest ``diag`` entry, and the columns
    of each group by decreasing ``diag``; ties keep column order. Returns ``perm`` with
    ``perm[k]`` = the original column processed k-th."""
    n = diag.numel()
    ng = n_groups(n, group_len)
    padded = torch.nn.functional.pad(diag, (0, ng * group_len - n), value=float("-inf"))
    vals, local = torch.sort(padded.view(ng, group_len), dim=1, descending=True, stable=True)
    group_order = torch.argsort(vals[:, 0], descending=True, stable=True)
    perm = (local + torch.arange(ng, device=diag.device).unsqueeze(1) * group_len)[group_order]
    perm = perm.reshape(-1)
    return perm[perm < n]


class _IntColumns:
    """How ``_solve`` rounds through an integer ``QuantSpec``: a group's (scale, zero) from its
    current weights (``search_qparams``), codes ``clamp(round(w / s) + z)``, dequantized
    ``(q - z) * s``; codes come back as uint8."""

    out_dtype = torch.uint8

    def __init__(self, scales: Tensor, zeros: Tensor, spec: QuantSpec, mse: MSEGrid | None, dtype: torch.dtype):
        self.s_rows, self.z_rows = scales.unbind(0), zeros.unbind(0)
        self.spec, self.mse = spec, mse
        # 0-dim tensors: an op with a Python scalar first wraps it in a tensor, which costs more
        # than the op itself on these short rows.
        self.lo = torch.tensor(0, dtype=dtype, device=scales.device)
        self.hi = torch.tensor(spec.maxq, dtype=dtype, device=scales.device)

    def start(self, g: int, cur: Tensor) -> None:
        s, z = search_qparams(cur.T, self.spec, self.mse)
        self.s_rows[g].copy_(s[:, 0])
        self.z_rows[g].copy_(z[:, 0])

    def round(self, g: int, w: Tensor, q: Tensor, e: Tensor) -> None:
        s, z = self.s_rows[g], self.z_rows[g]
        torch.div(w, s, out=q).round_().add_(z).clamp_(self.lo, self.hi)
        torch.sub(q, z, out=e).mul_(s)


class _FloatColumns:
    """How ``_solve`` rounds through a ``FloatSpec``: a group's scale from its current absmax
    (for fp8 blocks over the block's rows; ``grow`` [rows]: NVFP4's global scale per row),
    ``value = round_elements(w / (scale / global))``, dequantized ``value * (scale / global)``;
    values come back as float8_e4m3fn."""

    out_dtype = torch.float8_e4m3fn

    def __init__(self, scales: Tensor, grow: Tensor | None, spec: FloatSpec, dtype: torch.dtype):
        self.scales, self.s_rows, self.grow, self.spec, self.dtype = scales, scales.unbind(0), grow, spec, dtype
        self.eff: dict[int, Tensor] = {}

    def start(self, g: int, cur: Tensor) -> None:
        amax = _block_rows_max(cur.abs().amax(0).float(), self.spec.block_rows)
        self.s_rows[g].copy_(absmax_scales(amax, self.spec, self.grow))
        self.eff.pop(g, None)

    def round(self, g: int, w: Tensor, q: Tensor, e: Tensor) -> None:
        sc = self.eff.get(g)
        if sc is None:  # float32, as the exported scales divide
            s = self.s_rows[g]
            sc = self.eff[g] = (s if self.grow is None else s / self.grow).to(self.dtype)
        q.copy_(round_elements(w / sc, self.spec))
        torch.mul(q, sc, out=e)


def _solve(
    Wt: Tensor,
    U: Tensor,
    col_group: list[int],
    columns: _IntColumns | _FloatColumns,
    *,
    block_size: int,
    dynamic: bool,
    block_start: bool = False,
) -> tuple[Tensor, Tensor]:
    """GPTQ's column loop on ``Wt`` [n, rows] (transposed, in processing order, updated in place),
    rounding each column through ``columns`` (integer codes or float elements).

    The columns' scales [n_groups, rows] are read, and with ``dynamic`` written when a group's
    first column is reached (a group's columns are consecutive in processing order) from the
    group's current weights. ``col_group[c]`` is the group of processing column c. Returns the
    codes / element values [rows, n] in processing order and the per-row sum of squared scaled
    errors (twice GPTQ's loss).

    Every column is a contiguous row of ``Wt``, so each step is a handful of in-place vector
    ops. Error updates are lazy on two levels: within a sub-block of ``_SUB`` columns they are
    rank-1 (small enough to stay single-threaded: on a busy machine, waking a thread pool per
    column costs more than the arithmetic), to the rest of the block once per sub-block, and
    past the block once per block, each as one matmul.
    """
    n, rows = Wt.shape
    Q = torch.empty_like(Wt)  # codes as floats, processing order
    loss_rows = Wt.new_zeros(rows)
    w_rows, q_rows = Wt.unbind(0), Q.unbind(0)
    d = torch.diagonal(U).clone().unbind(0)
    ends: dict[int, int] = {}  # processing column where a group starts -> where it ends
    if dynamic:
        starts = [c for c in range(n) if c == 0 or col_group[c] != col_group[c - 1]]
        ends = dict(zip(starts, [*starts[1:], n], strict=True))
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        E1 = torch.zeros_like(Wt[i1:i2])  # scaled errors of the block's columns
        e_rows = E1.unbind(0)
        W0 = Wt[i1:i2].clone() if block_start and dynamic else None
        for j1 in range(i1, i2, _SUB):
            j2 = min(j1 + _SUB, i2)
            for c in range(j1, j2):
                g = col_group[c]
                if c in ends:
                    if W0 is not None:  # rows past the block are still as they were at its start
                        cur = torch.cat([W0[c - i1 : min(ends[c], i2) - i1], Wt[i2 : ends[c]]])
                    else:
                        cur = _current_rows(Wt, E1, U, c, ends[c], (j1, j2), (i1, i2))
                    columns.start(g, cur)
                w, e = w_rows[c], e_rows[c - i1]
                columns.round(g, w, q_rows[c], e)
                torch.sub(w, e, out=e).div_(d[c])
                if c + 1 < j2:
                    Wt[c + 1 : j2].addr_(U[c, c + 1 : j2], e, alpha=-1)
            if j2 < i2:
                Wt[j2:i2].addmm_(U[j1:j2, j2:i2].T, E1[j1 - i1 : j2 - i1], alpha=-1)
        if i2 < n:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
        loss_rows += E1.square().sum(0)
    return Q.T.to(columns.out_dtype), loss_rows


def _fused_supported(dtype: torch.dtype, spec: QuantSpec, block_size: int, group_range: GroupRange) -> bool:
    """Whether ``_solve_fused`` covers a solve: float32, scales the kernel rounds, and blocks it
    holds (with ``block_start`` ranges the blocks are the caller's; otherwise it picks them)."""
    return (dtype == torch.float32 and spec.scale_dtype in (None, torch.float32, torch.float16, torch.bfloat16)
            and (group_range != "block_start" or block_size <= select.GPTQ_MAX_BLOCK))


def _fused_blocks(n: int, block_size: int, ends: dict[int, int], *, free: bool, in_kernel: bool) -> list[int]:
    """Block bounds ``[0, ..., n]`` for ``_solve_fused``. With ``block_start`` ranges (not
    ``free``) they are the caller's blocks. Otherwise any bounds give the same result, so each
    block holds at most ``GPTQ_MAX_BLOCK`` columns, and a dynamic group that starts inside a block
    ends in it (the kernel takes its range from the block's columns); without ``in_kernel``
    qparams every group starts a block (they are computed before the launch)."""
    if not free:
        return [*range(0, n, block_size), n]
    size = min(block_size, select.GPTQ_MAX_BLOCK)
    starts = sorted(ends)
    bounds, i1 = [0], 0
    while i1 < n:
        i2 = min(i1 + size, n)
        inner = starts[bisect.bisect_right(starts, i1) : bisect.bisect_left(starts, i2)]  # starting inside
        if inner and not in_kernel:
            i2 = inner[0]
        elif inner and ends[inner[-1]] > i2:
            i2 = inner[-1]
        bounds.append(i2)
        i1 = i2
    return bounds


def _solve_fused(
    Wt: Tensor,
    U: Tensor,
    scales: Tensor,
    zeros: Tensor,
    col_group: list[int],
    spec: QuantSpec,
    *,
    block_size: int,
    dynamic: bool,
    mse: MSEGrid | None,
    block_start: bool = False,
) -> tuple[Tensor, Tensor]:
    """``_solve`` with each block's column loop in one Triton launch (``kernels.gptq``): same
    arguments, same results up to float rounding order. Qparams of a group that starts a
    block, and every group's with ``block_start`` ranges or an MSE search, are computed here
    before the launch (from the weights as they are then, which is what ``_solve`` reads); a
    dynamic min/max group starting inside a block gets them in the kernel."""
    from shardquant.kernels.gptq import gptq_block

    n, rows = Wt.shape
    Q = torch.empty_like(Wt)
    loss_rows = Wt.new_zeros(rows)
    ends: dict[int, int] = {}
    if dynamic:
        starts = [c for c in range(n) if c == 0 or col_group[c] != col_group[c - 1]]
        ends = dict(zip(starts, [*starts[1:], n], strict=True))
    in_kernel = not block_start and mse is None
    bounds = _fused_blocks(n, block_size, ends, free=not block_start, in_kernel=in_kernel)
    groups = torch.tensor(col_group, dtype=torch.int32, device=Wt.device)
    qend = torch.zeros(n, dtype=torch.int32)
    if in_kernel:  # groups starting inside a block; a block's first column's are computed here
        for c, e in ends.items():
            qend[c] = e
        qend[bounds[:-1]] = 0
    qend = qend.to(Wt.device)
    U = U if U.is_contiguous() else U.contiguous()
    E = Wt.new_empty(max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)), rows)
    starts = sorted(ends)
    for i1, i2 in zip(bounds[:-1], bounds[1:], strict=True):
        here = starts[bisect.bisect_left(starts, i1) : bisect.bisect_left(starts, i2)]  # groups starting here
        if in_kernel:  # only a group starting the block: the kernel ranges the others
            here = here[:1] if here and here[0] == i1 else []
        for c in here:
            s, z = search_qparams(Wt[c : ends[c]].T, spec, mse)
            scales[col_group[c]].copy_(s[:, 0])
            zeros[col_group[c]].copy_(z[:, 0])
        gptq_block(Wt, U, Q, E, scales, zeros, groups, qend, i1, i2, maxq=spec.maxq,
                   symmetric=spec.symmetric, scale_dtype=spec.scale_dtype)
        E1 = E[: i2 - i1]
        if i2 < n:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
        loss_rows += E1.square().sum(0)
    return Q.T.to(torch.uint8), loss_rows


def _current_rows(
    Wt: Tensor, E1: Tensor, U: Tensor, c: int, end: int, sub: tuple[int, int], block: tuple[int, int]
) -> Tensor:
    """Current weights of processing columns [c, end) as rows of ``Wt``: rows past the
    sub-block (or past the block) still lack the updates of the errors already in ``E1``."""
    (j1, j2), (i1, i2) = sub, block
    parts = [Wt[c : min(j2, end)]]
    if end > j2 and j2 < i2:
        m = min(i2, end)
        parts.append(Wt[j2:m] - U[j1:c, j2:m].T @ E1[j1 - i1 : c - i1])
    if end > i2:
        parts.append(Wt[i2:end] - U[i1:c, i2:end].T @ E1[: c - i1])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def gptq_quantize(
    weight: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    reorder: Reorder = "none",
    mse: MSEGrid | None = None,
    group_range: GroupRange = "current",
) -> GPTQResult:
    """One-shot GPTQ of one weight; computes in float64 if ``weight`` or ``H`` is float64."""
    fresh = weight.dtype == torch.float64 and H.dtype != torch.float64
    if fresh:
        H = H.to(torch.float64)  # a new matrix the solver may work in
    solver = GPTQSolver(H, damp=damp, act_order=act_order, reorder=reorder, group_size=spec.group_size,
                        overwrite_h=fresh)
    return solver.quantize(weight, spec, block_size=block_size, static_groups=static_groups, mse=mse,
                           group_range=group_range)


def _damped_inverse_cholesky(H: Tensor, damp: float, work: Tensor) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp on failure.

    ``H``'s diagonal is damped in place; the factor, the inverse and its upper factor are all
    computed in ``work`` (an in×in buffer in column-major layout, where LAPACK works in place;
    a row-major one would cost a hidden copy per step), so H survives for a retry and nothing
    else in×in is allocated. The factor is returned row-major, transposed in place in ``work``.
    """
    diag = torch.diagonal(H)
    mean_diag = diag.mean()  # of the strided view, as ever: a contiguous copy sums in another order
    undamped = diag.clone()
    info = torch.empty((), dtype=torch.int32, device=H.device)
    tried = []
    for attempt in range(_DAMP_RETRIES + 1):
        frac = damp if attempt == 0 else max(damp, 1e-3) * 10**attempt
        tried.append(frac)
        diag.copy_(undamped.add(frac * mean_diag))
        torch.linalg.cholesky_ex(H, out=(work, info))
        if info.item() != 0:
            continue
        torch.cholesky_inverse(work, out=work)
        torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
        if info.item() == 0 and _all_finite(work):
            return _transpose_(work.T), frac
    raise ValueError(
        f"Hessian is not positive definite even with damping fractions {tried}; "
        "the calibration activations are degenerate (too few tokens or NaNs upstream?)"
    )


def _transpose_(m: Tensor, panel: int = 256) -> Tensor:
    """Transpose square ``m`` in place, a row panel and its mirrored column panel at a time
    (one panel-sized temporary). Returns ``m``."""
    n = m.shape[0]
    for i in range(0, n, panel):
        j = min(i + panel, n)
        d = m[i:j, i:j]
        d.copy_(d.T.clone())
        if j < n:
            top = m[i:j, j:].clone()
            m[i:j, j:].copy_(m[j:, i:j].T)
            m[j:, i:j].copy_(top.T)
    return m


def _all_finite(t: Tensor, panel: int = 256) -> bool:
    """Whether every entry of ``t`` is finite, checked by row panels (no full-size mask)."""
    return all(bool(torch.isfinite(t[i : i + panel]).all()) for i in range(0, t.shape[0], panel))
