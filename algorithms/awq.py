"""AWQ: activation-aware per-channel scales, and the clip search that goes with them.

Activation-aware weight quantization (Lin et al., 2023) protects the input channels that see
large activations. For linears sharing an input ``x`` and a per-input-channel scale ``s > 0``,

    x W^T = (x / s) (W * s)^T

so the columns of every linear of the group are multiplied by ``s`` and the op that produces
``x`` (a norm's weight, or the rows of the previous linear) is divided by ``s``: the network
computes the same function before rounding, but quantizing ``W * s`` rounds the salient
columns on a finer relative grid. ``s = mean|x| ** alpha`` (optionally divided by
``mean|w| ** (1 - alpha)``, "duo scaling"), and ``alpha`` is picked on a grid
(``candidate_scales``, ``choose_index``) by the output error of the module that consumes ``x``,
measured by the runner (``shardquant.calib.awq_search``): this module never knows how that
output is computed, nor how the weights get packed.

After scaling, a per-(row, group) clip search shrinks each group's range when that lowers the
error of the group's partial products on a subsample of the (scaled) inputs.

Everything here is pure tensor math; hooks, forwards and modules live in the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shardquant.kernels import select

from .quantizer import QuantizedWeight, QuantSpec, compute_qparams, fake_quantize, grouped

ROW_CHUNK_ELEMENTS = 1 << 24  # per-row work on a weight goes this many elements (64 MB in fp32) at a time
SCALE_MIN = 1e-4  # raw scales are clamped to [SCALE_MIN, SCALE_MAX] before normalization
SCALE_MAX = 1e4
_EPS = 1e-12


class ChannelStats:
    """Exact ``(sum |x|, count)`` per input channel, for ``mean|x|``.

    Like the Hessian accumulator, it keeps the raw sum and the row count so that partial
    statistics from many batches or workers merge by plain addition.
    """

    sum: Tensor
    count: int

    def __init__(
        self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.sum = torch.zeros(in_features, device=device, dtype=dtype)
        self.count = 0

    def add(self, x: Tensor) -> None:
        """Add activations ``x`` [..., in]; every leading index is one row."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features).to(device=self.sum.device, dtype=self.sum.dtype)
        self.sum += rows.abs().sum(dim=0)
        self.count += rows.shape[0]

    def merge(self, other: ChannelStats) -> None:
        """Add another accumulator's rows into this one."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge {other.in_features} features into {self.in_features}")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.sum.dtype)
        self.count += other.count

    def mean(self) -> Tensor:
        """``mean|x|`` per input channel."""
        if self.count == 0:
            raise ValueError("no activations were added; mean |x| is undefined")
        return self.sum / self.count


def row_chunks(out_features: int, in_features: int, elements: int | None = None) -> list[slice]:
    """Contiguous row ranges of a weight [out, in], each about `elements` large (at least one
    row; default `ROW_CHUNK_ELEMENTS`): per-row work (grouping, fake quantization, errors) done
    a chunk at a time holds a chunk's temporaries instead of whole-weight copies."""
    step = max(1, (elements or ROW_CHUNK_ELEMENTS) // max(1, in_features))
    return [slice(a, min(a + step, out_features)) for a in range(0, out_features, step)]


def weight_mean(weights: Sequence[Tensor], spec: QuantSpec) -> Tensor:
    """Mean over all output rows of ``|w| / max|w|`` of its quantization group, per input column.

    The rows [out_i, in] of every linear of a group count alike; normalizing within each
    group makes the statistic say where a column sits in its group's range, not how large the
    layer is. Weights larger together than a chunk (`row_chunks`) are summed a chunk of rows at
    a time (in float64), so no whole-weight copy is made.
    """
    if sum(t.numel() for t in weights) <= ROW_CHUNK_ELEMENTS:
        return _group_relative_abs(torch.cat([t.float() for t in weights], dim=0), spec).mean(dim=0)
    total, rows = None, 0
    for t in weights:
        for r in row_chunks(*t.shape):
            part = _group_relative_abs(t[r].float(), spec).sum(dim=0, dtype=torch.float64)
            total = part if total is None else total + part
            rows += r.stop - r.start
    return (total / rows).float()


def _group_relative_abs(w: Tensor, spec: QuantSpec) -> Tensor:
    """``|w| / max|w|`` of its quantization group, for a float32 weight [rows, in]."""
    g = grouped(w.abs(), spec)
    g = g / (g.amax(dim=-1, keepdim=True) + _EPS)
    return g.reshape(w.shape[0], -1)[:, : w.shape[1]]


def awq_scales(x_mean: Tensor, ratio: float, w_mean: Tensor | None = None) -> Tensor:
    """Per-input-channel scales for one grid ratio ``alpha`` in [0, 1).

    ``x_mean ** alpha`` (or ``x_mean ** alpha / w_mean ** (1 - alpha)`` when ``w_mean`` is
    given), clamped to [SCALE_MIN, SCALE_MAX] so no channel is zeroed or blown up, then divided
    by ``sqrt(max * min)`` so the scales are centred on 1 in log space. Float32.
    """
    x = x_mean.float().clamp(min=_EPS)
    s = x.pow(ratio)
    if w_mean is not None:
        s = s / w_mean.float().clamp(min=_EPS).pow(1 - ratio)
    s = s.clamp(SCALE_MIN, SCALE_MAX)
    return s / (s.max() * s.min()).sqrt()


def _fake_quant_kernel(w: Tensor, spec: QuantSpec) -> bool:
    """Whether the fused kernel (``kernels.fakequant``) fake-quantizes ``w`` (the kernel mode's
    choice; float64 stays on the reference)."""
    return select.use_triton("fake_quant", w, supported=w.dtype != torch.float64)


def fake_quantize_weight(w: Tensor, spec: QuantSpec) -> Tensor:
    """Round-to-nearest fake quantization of ``w`` [out, in] (equals ``quantize_rtn(...).dequantize()``)."""
    if _fake_quant_kernel(w, spec):
        from shardquant.kernels.fakequant import fake_quant

        return fake_quant(w, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                          scale_dtype=spec.scale_dtype)
    return _fake_quantize_weight_torch(w, spec)


def _fake_quantize_weight_torch(w: Tensor, spec: QuantSpec) -> Tensor:
    """``fake_quantize_weight``'s plain-torch reference."""
    x = w if w.dtype == torch.float64 else w.float()
    g = grouped(x, spec)
    scale, zero = compute_qparams(g, spec)
    return fake_quantize(g, scale, zero, spec.maxq).reshape(x.shape[0], -1)[:, : x.shape[1]]


def scaled_fake_quantize(w: Tensor, s: Tensor, spec: QuantSpec) -> Tensor:
    """``Q(w * s) / s``: the weight the layer effectively has once scaled and quantized."""
    s = s.to(device=w.device, dtype=torch.float32)
    if _fake_quant_kernel(w, spec):  # the pre-scale and the division by it in the same pass
        from shardquant.kernels.fakequant import fake_quant

        return fake_quant(w, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                          scale_dtype=spec.scale_dtype, pre_scale=s)
    return _fake_quantize_weight_torch(w.float() * s, spec) / s


def linear_output_error(delta: Tensor, gram: Tensor) -> float:
    """``||X delta^T||^2`` from ``gram = X^T X`` [in, in]: the summed squared output change of
    a linear whose weight [out, in] moved by ``delta``, without touching the rows of ``X``
    (``out * in^2`` flops instead of ``rows * out * in``). Float32."""
    d = delta.to(device=gram.device, dtype=torch.float32)
    return float(((d @ gram.float()) * d).sum())


def scaled_quantization_error(w: Tensor, s: Tensor, spec: QuantSpec, gram: Tensor) -> float:
    """``linear_output_error(Q(w * s) / s - w, gram)`` summed a chunk of rows at a time: the
    output error candidate scale ``s`` causes, without a whole-weight temporary."""
    total = 0.0
    for r in row_chunks(*w.shape):
        wr = w[r].float()
        total += linear_output_error(scaled_fake_quantize(wr, s, spec) - wr, gram)
    return total


def candidate_scales(x_mean: Tensor, *, grid: int = 20, w_mean: Tensor | None = None) -> list[Tensor]:
    """The scales a search tries, in order: ``s = 1`` first, then ``alpha = i / grid`` for ``i < grid``."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    return [ones] + [awq_scales(x_mean, i / grid, w_mean) for i in range(grid)]


@dataclass
class Choice:
    """The winning candidate of a search: ``index`` into ``candidate_scales`` (0 = identity)."""

    index: int
    loss: float
    identity_loss: float


def choose_index(losses: Sequence[float]) -> Choice:
    """The candidate with the lowest loss; the identity (index 0) unless one is strictly better."""
    best = 0
    for i in range(1, len(losses)):
        if float(losses[i]) < float(losses[best]):
            best = i
    return Choice(best, float(losses[best]), float(losses[0]))


@dataclass
class ClipSearch:
    """Per-(row, group) clip ratios and the partial-product errors behind them.

    ``ratio``, ``err`` and ``err_unclipped`` are [out, n_groups]; ``err <= err_unclipped``
    everywhere because ratio 1.0 (no clipping) is on the grid.
    """

    ratio: Tensor
    err: Tensor
    err_unclipped: Tensor


def clip_ranges(w: Tensor, spec: QuantSpec, ratio: Tensor | float) -> tuple[Tensor, Tensor]:
    """The clamp bounds [out, n_groups, 1] of each group's range shrunk by ``ratio``.

    Symmetric: ``±max|w| * ratio``; asymmetric: ``[min(w, 0), max(w, 0)] * ratio``.
    """
    g = grouped(w.float(), spec)
    if spec.symmetric:
        hi = g.abs().amax(dim=-1, keepdim=True)
        lo = -hi
    else:
        hi = g.amax(dim=-1, keepdim=True).clamp(min=0)
        lo = g.amin(dim=-1, keepdim=True).clamp(max=0)
    r = ratio if isinstance(ratio, float) else ratio.unsqueeze(-1)
    return lo * r, hi * r


def apply_clip(w: Tensor, spec: QuantSpec, ratio: Tensor) -> Tensor:
    """``w`` [out, in] with each (row, group) clamped to its range shrunk by ``ratio`` [out, n_groups]."""
    lo, hi = clip_ranges(w, spec, ratio)
    g = grouped(w.float(), spec)
    return torch.clamp(g, lo, hi).reshape(w.shape[0], -1)[:, : w.shape[1]]


def search_clip(
    w: Tensor,
    x: Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    row_batch: int = 256,
) -> ClipSearch:
    """Pick, for every (output row, group), the range shrink that best preserves its partial products.

    Ratios ``1 - i / grid`` for ``i < max_shrink * grid`` (1.0 first); the error of a
    (row, group) is ``mean_t (x_t,g . w_g - x_t,g . Q(clip(w_g)))^2`` over the rows ``x`` [n, in]
    (a subsample of the inputs the quantized weight will see). Computed in float32,
    ``row_batch`` output rows at a time.
    """
    if w.dim() != 2 or x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need w [out, in] and x [n, in], got {tuple(w.shape)} and {tuple(x.shape)}")
    n_ratios = max(1, int(round(max_shrink * grid)))
    ratios = [1.0 - i / grid for i in range(n_ratios)]
    wf = w.float()
    xg = grouped(x.to(device=w.device, dtype=torch.float32), spec)  # [n, ng, gl]
    out_f = w.shape[0]
    ng = xg.shape[1]
    best_ratio = torch.ones(out_f, ng, device=w.device)
    best_err = torch.empty(out_f, ng, device=w.device)
    base_err = torch.empty(out_f, ng, device=w.device)
    for r0 in range(0, out_f, row_batch):
        r1 = min(r0 + row_batch, out_f)
        wg = grouped(wf[r0:r1], spec)  # [b, ng, gl]
        ref = torch.einsum("ngk,bgk->bng", xg, wg)
        lo, hi = clip_ranges(wf[r0:r1], spec, 1.0)
        for j, ratio in enumerate(ratios):
            cw = torch.clamp(wg, lo * ratio, hi * ratio)
            scale, zero = compute_qparams(cw, spec)
            qw = fake_quantize(cw, scale, zero, spec.maxq)
            err = (torch.einsum("ngk,bgk->bng", xg, qw) - ref).pow(2).mean(dim=1)  # [b, ng]
            if j == 0:
                base_err[r0:r1] = err
                best_err[r0:r1] = err
                continue
            better = err < best_err[r0:r1]
            best_err[r0:r1] = torch.where(better, err, best_err[r0:r1])
            best_ratio[r0:r1] = torch.where(better, torch.full_like(err, ratio), best_ratio[r0:r1])
    return ClipSearch(best_ratio, best_err, base_err)


def even_indices(total: int, n: int) -> Tensor:
    """``n`` evenly spaced row indices in [0, total) (all rows when total <= n)."""
    if total <= n:
        return torch.arange(total)
    return torch.linspace(0, total - 1, n).round().long()


def take_rows(batches: Sequence[Tensor], idx: Tensor) -> Tensor:
    """Rows ``idx`` (sorted, into the concatenation of the batches' rows) as float32 [len(idx), in]."""
    flat = [b.reshape(-1, b.shape[-1]) for b in batches]
    out, start = [], 0
    for f in flat:
        end = start + f.shape[0]
        mine = idx[(idx >= start) & (idx < end)] - start
        if len(mine):
            out.append(f[mine.to(f.device)].float())
        start = end
    if not out:
        width = flat[0].shape[-1] if flat else 0
        return torch.zeros(0, width)
    return torch.cat(out)


def subsample_rows(batches: Sequence[Tensor], n: int) -> Tensor:
    """At most ``n`` rows [n, in], evenly spaced over all rows of ``batches`` [..., in] (deterministic)."""
    total = sum(b.reshape(-1, b.shape[-1]).shape[0] for b in batches)
    if total == 0:
        raise ValueError("no input rows")
    return take_rows(batches, even_indices(total, n))


# --- folding (exact before rounding) ------------------------------------------------------


@torch.no_grad()
def scale_columns_(weight: Tensor, s: Tensor) -> None:
    """In place: input columns of a linear's weight [out, in] multiplied by ``s`` [in]."""
    weight.mul_(s.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def fold_into_norm_(weight: Tensor, bias: Tensor | None, s: Tensor) -> None:
    """In place: a norm's affine weight (and bias) [in] divided by ``s``, so its output is ``y / s``."""
    weight.div_(s.to(device=weight.device, dtype=weight.dtype))
    if bias is not None:
        bias.div_(s.to(device=bias.device, dtype=bias.dtype))


@torch.no_grad()
def fold_into_rows_(weight: Tensor, bias: Tensor | None, s: Tensor) -> None:
    """In place: output rows of the previous linear [out, in] (and bias [out]) divided by ``s`` [out]."""
    weight.div_(s.to(device=weight.device, dtype=weight.dtype).unsqueeze(1))
    if bias is not None:
        bias.div_(s.to(device=bias.device, dtype=bias.dtype))


def rescale_rows(qw: QuantizedWeight, s: Tensor) -> QuantizedWeight:
    """An already quantized weight with output row ``r`` divided by ``s[r]``.

    Codes and zero points are unchanged (the rounding grid of a row scales with the row);
    only the row's scales are divided, rounded through ``spec.scale_dtype`` as
    ``compute_qparams`` rounds them.
    """
    scales = qw.scales / s.to(device=qw.scales.device, dtype=torch.float32).unsqueeze(1)
    store = qw.spec.scale_dtype or torch.float32
    info = torch.finfo(store)
    scales = scales.clamp(info.tiny, info.max).to(store).float()
    return QuantizedWeight(codes=qw.codes, scales=scales, zeros=qw.zeros, g_idx=qw.g_idx, spec=qw.spec)


def scaled_hessian(H: Tensor, s: Tensor, *, inplace: bool = False, panel: int = 256) -> Tensor:
    """The Hessian of the scaled inputs ``x / s``: ``H / (s s^T)``, from the Hessian of ``x``.

    ``inplace`` divides ``H`` itself, a row panel at a time (same values, no in×in temporary:
    for a solver that then takes H over, see ``GPTQSolver(overwrite_h=True)``).
    """
    s = s.to(device=H.device, dtype=H.dtype)
    if not inplace:
        return H / (s.unsqueeze(1) * s.unsqueeze(0))
    for i in range(0, H.shape[0], panel):
        H[i : i + panel].div_(s[i : i + panel].unsqueeze(1) * s.unsqueeze(0))
    return H
