"""Uniform integer quantization: specs, qparams, codes and fake-quant.

Codes are always unsigned (0..maxq) with an integer zero point. A symmetric spec uses the
fixed zero 2**(bits-1), which makes ``code - zero`` the signed code in
[-2**(bits-1), 2**(bits-1) - 1] that signed packed formats (compressed-tensors) store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shardquant.algorithms.counts import n_groups


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: bit width, group size and zero-point scheme.

    ``scale_dtype`` is the dtype packed formats store scales in; scales are rounded to its
    values when computed, so fake-quant during solving equals the exported weights exactly.
    ``None`` keeps float32 scales.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: torch.dtype | None = torch.float16

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if self.scale_dtype is not None and not self.scale_dtype.is_floating_point:
            raise ValueError(f"scale_dtype must be a floating dtype, got {self.scale_dtype}")

    @property
    def maxq(self) -> int:
        """Largest unsigned code."""
        return 2**self.bits - 1

    def group_len(self, in_features: int) -> int:
        """Input columns per group (all of them for per-channel)."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        """Groups per output row; a trailing partial group counts as one."""
        return n_groups(in_features, self.group_size)


def compute_qparams(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min/max qparams over the last dim of ``w`` [..., k].

    The range always includes 0, so zero is exactly representable. Returns ``scale`` [..., 1]
    (float32, rounded through ``spec.scale_dtype``) and ``zero`` [..., 1] (float32 holding
    integers in [0, maxq]). An all-zero group gets scale 1 instead of 0.
    """
    x = w if w.dtype == torch.float64 else w.float()
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    return range_qparams(xmin, xmax, spec)


def range_qparams(xmin: Tensor, xmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Qparams of the ranges ``[xmin, xmax]`` (``xmin <= 0 <= xmax``), as ``compute_qparams``."""
    maxq = spec.maxq
    if spec.symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = 2 * absmax / maxq
    else:
        scale = (xmax - xmin) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    store = spec.scale_dtype or torch.float32
    info = torch.finfo(store)
    scale = scale.clamp(info.tiny, info.max).to(store).to(xmin.dtype)
    if spec.symmetric:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale.float(), zero.float()


@dataclass(frozen=True)
class MSEGrid:
    """Range shrink search: ratios ``1 - i / grid`` for ``i < max_shrink * grid`` (1 included),
    scored by ``sum |fake_quant(w) - w| ** norm`` over each group. Peers' defaults: llm-compressor's
    ``mse`` observer uses grid 100, max_shrink 0.2, norm 2.4."""

    grid: int = 100
    max_shrink: float = 0.2
    norm: float = 2.4

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in (0, 1), got {self.max_shrink}")
        if self.norm <= 0:
            raise ValueError(f"norm must be positive, got {self.norm}")

    def ratios(self) -> list[float]:
        """Shrink ratios tried, 1.0 (min/max) first."""
        return [1 - i / self.grid for i in range(max(1, int(self.max_shrink * self.grid)))]


def mse_qparams(w: Tensor, spec: QuantSpec, search: MSEGrid) -> tuple[Tensor, Tensor]:
    """Qparams over the last dim of ``w`` [..., k] whose range, shrunk by the best ratio of
    ``search``, minimizes each group's ``sum |fake_quant(w) - w| ** norm``.

    Ratio 1 is min/max (``compute_qparams``); another ratio wins only when strictly better, so
    no group's error exceeds min/max's.
    """
    x = w if w.dtype == torch.float64 else w.float()
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    best_s = best_z = best_err = None
    for p in search.ratios():
        s, z = range_qparams(xmin * p, xmax * p, spec)
        err = (fake_quantize(x, s, z, spec.maxq) - x).abs_().pow_(search.norm).sum(-1, keepdim=True)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def search_qparams(w: Tensor, spec: QuantSpec, mse: MSEGrid | None = None) -> tuple[Tensor, Tensor]:
    """``mse_qparams`` when ``mse`` is given, else min/max ``compute_qparams``."""
    return compute_qparams(w, spec) if mse is None else mse_qparams(w, spec, mse)


def grouped(w: Tensor, spec: QuantSpec) -> Tensor:
    """View ``w`` [out, in] as [out, n_groups, group_len] groups of consecutive columns.

    A trailing partial group is padded with zeros, which leaves its qparams unchanged because
    the range always includes 0.
    """
    out_f, in_f = w.shape
    glen, ng = spec.group_len(in_f), spec.n_groups(in_f)
    return torch.nn.functional.pad(w, (0, ng * glen - in_f)).reshape(out_f, ng, glen)


def group_qparams(
    w: Tensor, spec: QuantSpec, mse: MSEGrid | None = None
) -> tuple[Tensor, Tensor]:
    """Qparams of every group of ``w`` [out, in] in column order: scale, zero [out, n_groups]."""
    scale, zero = search_qparams(grouped(w, spec), spec, mse)
    return scale.squeeze(-1), zero.squeeze(-1)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Unsigned integer codes ``clamp(round(w / scale) + zero, 0, maxq)`` as uint8 (bits <= 8:
    a quarter of int32's memory while a block's solved weights wait to be written)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.uint8)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Float32 weights ``(codes - zero) * scale``."""
    return (codes.float() - zero.float()) * scale.float()


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Quantize and dequantize in one step, in w's precision (at least float32)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return (q - zero) * scale


@dataclass
class QuantizedWeight:
    """A linear layer's quantized weight in original column order.

    ``g_idx[j]`` is the group of input column ``j``; it is ``j // group_len`` except after
    act-order without static groups, where groups follow the processing order.
    """

    codes: Tensor  # uint8 [out, in], unsigned 0..maxq
    scales: Tensor  # float32 [out, n_groups]
    zeros: Tensor  # int32 [out, n_groups]
    g_idx: Tensor  # int32 [in]
    spec: QuantSpec

    def dequantize(self) -> Tensor:
        """Float32 [out, in] weights the codes stand for."""
        g = self.g_idx.long()
        return dequantize_codes(self.codes, self.scales[:, g], self.zeros[:, g])


def concat_rows(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """One weight from slices of its output rows, in order (a linear solved in row slices).

    The parts must share the spec and ``g_idx``: rows are quantized independently, and a
    GPTQ solver's column order comes from H alone, so slices of one linear always do.
    """
    if not parts:
        raise ValueError("no parts to concatenate")
    first = parts[0]
    for p in parts[1:]:
        if p.spec != first.spec:
            raise ValueError(f"parts have different specs: {first.spec} and {p.spec}")
        if not torch.equal(p.g_idx, first.g_idx):
            raise ValueError("parts have different g_idx: they were not solved with one column order")
    return QuantizedWeight(
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=torch.cat([p.zeros for p in parts]),
        g_idx=first.g_idx.clone(),
        spec=first.spec,
    )
